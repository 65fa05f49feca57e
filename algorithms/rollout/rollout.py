"""The rollout: a policy's completions for a batch of prompts, scored by the environment.

One path for training (``finetune_llm_reasoning``), held-out evaluation (fitness, ``agent.test``)
and ``llm-gym eval`` (the oracle or a model), so all three report the same metrics::

    prompts --policy.get_action--> completions --env.score--> rewards [P, G] and metrics
    multi-turn env (MultiTurnEnv):  generate -> env step -> generate ... (multi_turn.run_episodes)

Metric names (means over every scored completion of the batch, or of the evaluation):
``reward/total``, ``reward/<part>`` for each rubric part, ``accuracy`` (exact: the task's correct
part scores 1; when the env knows it), ``reward/failures`` (reward functions that failed, a count);
evaluations add ``problems`` (how many were answered).

A policy is anything with ``get_action(prompts, training=...)`` returning ``(completions, masks)``:
per prompt a ``[G, L + C]`` id tensor and its action mask (a GRPO agent, :class:`ModelPolicy`), or
``G`` completion strings and ``None`` (:class:`OraclePolicy`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from llm_gym.algorithms.rollout.multi_turn import MultiTurnEnv, run_episodes
from llm_gym.rollout_record import RolloutRecord, scored_record
from llm_gym.rubric import Score

__all__ = ["Policy", "Rollout", "batch_records", "evaluate", "evaluate_with", "rollout"]


@runtime_checkable
class Policy(Protocol):
    """What the rollout needs from a policy."""

    def get_action(self, prompts: Sequence[dict[str, Any]], training: bool = True) -> tuple[list[Any], Any]:
        """Per prompt: ``G`` completions (ids ``[G, L + C]`` with masks, or strings with ``None``)."""
        ...


@dataclass
class Rollout:
    """Scored completions of one batch of prompts.

    Attributes:
        completion_ids: Per prompt ``[G, S_i]`` ids (prompt, then the model's and, in a multi-turn
            episode, the environment's turns), or ``G`` strings from a text policy.
        action_masks: Per prompt ``[G, S_i - 1]`` bool, True where the next token is the model's;
            None from a text policy.
        rewards: ``[P, G]``, one per completion (trajectory).
        metrics: The batch's means (see the module docstring).
        scores: Per prompt and completion, the rubric's :class:`~llm_gym.rubric.Score` when the env
            keeps them (``last_scores``), else empty.
        texts: Per prompt and completion, the scored text when the env keeps it (``last_texts``).
        turns: Model turns of the longest episode (1 for single-turn tasks).
    """

    completion_ids: list[Any]
    action_masks: list[Tensor] | None
    rewards: Tensor
    metrics: dict[str, float]
    scores: list[list[Score]]
    texts: list[list[str]] | None = None
    turns: int = 1

    @property
    def experience(self) -> tuple[list[Any], list[Tensor] | None, Tensor]:
        """``(completion_ids, action_masks, rewards)``, what :meth:`GRPO.learn` takes."""
        return self.completion_ids, self.action_masks, self.rewards

    @property
    def num_prompts(self) -> int:
        """``P``."""
        return len(self.completion_ids)


def rollout(policy: Any, env: Any, prompts: Sequence[dict[str, Any]], *, training: bool = True) -> Rollout:
    """Generate completions for ``prompts`` (the env's pending batch) and score them.

    The env's batch stays pending (``env.score``), so several agents of a population can be rolled
    out on the same prompts; ``env.reset()`` moves on.

    Args:
        policy: A :class:`Policy` (a GRPO agent samples ``G`` completions per prompt when training).
        env: A :class:`~llm_gym.reasoning_gym.ReasoningGym`, or a
            :class:`~llm_gym.algorithms.rollout.multi_turn.MultiTurnEnv` (episodes of several turns).
        prompts: The batch ``env.reset()`` returned.
        training: Sample with the policy's settings; False: one greedy completion per prompt.

    Returns:
        The :class:`Rollout`.
    """
    if isinstance(env, MultiTurnEnv):
        episodes = run_episodes(policy, env, prompts, training=training)
        completions, masks, rewards = episodes.completion_ids, episodes.action_masks, episodes.rewards
        turns = episodes.turns
    else:
        completions, masks = policy.get_action(prompts, training=training)
        rewards, turns = env.score(completions), 1
    return Rollout(
        completion_ids=completions, action_masks=masks, rewards=rewards, metrics=env.last_metrics(),
        scores=list(getattr(env, "last_scores", [])), texts=getattr(env, "last_texts", None), turns=turns,
    )  # fmt: skip


def batch_records(batch: Rollout, env: Any, problems: Sequence[dict[str, Any]], first: int) -> list[RolloutRecord]:
    """The :class:`~llm_gym.rollout_record.RolloutRecord` of every scored completion of a single-turn batch.

    Args:
        batch: The scored batch (its ``texts`` and ``scores``).
        env: The ReasoningGym that scored it (its template and ``correct_part``).
        problems: The batch's problems (``env.pending_problems()``), in prompt order.
        first: Index of the batch's first problem in the evaluated split.

    Returns:
        One record per (prompt, completion), the same records an endpoint evaluation writes.
    """
    records = []
    for i, (problem, texts, scores) in enumerate(zip(problems, batch.texts or [], batch.scores, strict=True)):
        masks = batch.action_masks[i] if batch.action_masks is not None else None
        for g, (text, score) in enumerate(zip(texts, scores, strict=True)):
            tokens = int(masks[g].sum()) if masks is not None else None  # the model's tokens of the completion
            records.append(scored_record(first + i, g, problem, env.template.render(problem), text, score,
                                         env.correct_part, tokens))  # fmt: skip
    return records


def evaluate(
    policy: Any,
    env: Any,
    max_problems: int | None = None,
    *,
    greedy: bool = True,
    split: str = "test",
    records: list[RolloutRecord] | None = None,
) -> dict[str, float]:
    """Mean rewards of ``policy`` on a held-out split of the env: every problem once, in a fixed order.

    Fitness is measured on the same fixed problems for every agent and every evaluation, so agents
    are compared on equal terms, and the env's training position is untouched (ReasoningGym keeps
    a pending batch per split).

    Args:
        policy: A :class:`Policy`.
        env: A :class:`~llm_gym.reasoning_gym.ReasoningGym` (``eval_mode``, ``reset``, ``score``,
            ``last_metrics``, ``num_problems``) or a multi-turn env.
        max_problems: Evaluate the first this-many problems (rounded up to whole batches); default all.
        greedy: One greedy completion per problem (fitness). ``False`` samples the policy's
            ``group_size`` completions per problem with its sampling settings: the policy's expected
            reward, which moves smoothly where the greedy output of a small model flips for every
            problem at once.
        split: ``"test"`` (the final report) or ``"validation"`` (fitness: selection then never
            sees the report's problems; a ReasoningGym built with ``validation_size``).
        records: When given (a single-turn env), every scored completion is appended to it as a
            :class:`~llm_gym.rollout_record.RolloutRecord` (``llm-gym eval``'s report and dataset).

    Returns:
        The metrics of the module docstring, ``problems`` included.
    """
    def roll(prompts: Sequence[dict[str, Any]]) -> list[Rollout]:
        return [rollout(policy, env, prompts, training=not greedy)]

    return evaluate_with(env, roll, 1, max_problems, split=split, records=records)[0]


def evaluate_with(
    env: Any,
    roll: Callable[[Sequence[dict[str, Any]]], list[Rollout]],
    count: int,
    max_problems: int | None = None,
    *,
    split: str = "test",
    records: list[RolloutRecord] | None = None,
) -> list[dict[str, float]]:
    """The loop of :func:`evaluate` for ``count`` policies rolled out together on each batch.

    Args:
        env: As in :func:`evaluate`.
        roll: Scores the env's pending batch for every policy: ``prompts -> [Rollout] * count``
            (e.g. a population's batched decode, :mod:`~llm_gym.algorithms.rollout.population`).
        count: How many policies ``roll`` answers for.
        max_problems: As in :func:`evaluate`.
        split: As in :func:`evaluate`.
        records: As in :func:`evaluate`: the first policy's scored completions (single-turn env).

    Returns:
        Per policy, the metrics of :func:`evaluate`.
    """
    total = env.num_problems(split)
    if max_problems is not None:
        total = min(total, max_problems)
    sums: list[dict[str, float]] = [{} for _ in range(count)]
    seen = 0
    with env.eval_mode() if split == "test" else env.eval_mode(split):  # a multi-turn env takes no split
        prompts = env.reset(reset_dataloaders=True)
        while True:
            problems = env.pending_problems() if records is not None else None
            batches = roll(prompts)
            if problems is not None:
                records.extend(batch_records(batches[0], env, problems, seen))
            seen += batches[0].num_prompts
            for batch, total_of in zip(batches, sums, strict=True):
                for key, value in batch.metrics.items():
                    weight = 1.0 if key == "reward/failures" else batch.num_prompts
                    total_of[key] = total_of.get(key, 0.0) + value * weight
            if seen >= total:
                break
            prompts = env.reset()
    out = []
    for total_of in sums:
        metrics = {k: (v if k == "reward/failures" else v / seen) for k, v in total_of.items()}
        metrics["problems"] = float(seen)
        out.append(metrics)
    return out
