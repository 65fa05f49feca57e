"""Dynamic sampling (DAPO): train only on groups whose completions do not all score the same.

A group whose ``G`` completions all get the same total reward has advantages of exactly 0: with
``beta == 0`` it adds nothing to the gradient, yet it takes a slot of the batch (and its tokens
still count in the ``dapo``/``dr_grpo`` normalisers), so the effective batch shrinks as the policy
gets all-right or all-wrong on more prompts. Dynamic sampling drops those groups and draws more
prompts until the batch holds as many informative groups as the step's prompt batch, with at most
``max_refills`` extra draws; then it trains on what there is. TRL has no such option (its issues
#3708, #3973, #4764); veRL's DAPO recipe reports +2 points on AIME from it.

On with ``GRPOConfig.dynamic_sampling``. The training loop calls :func:`sample` instead of a plain
rollout; :meth:`GRPO.learn <llm_gym.algorithms.grpo.agent.GRPO.learn>` itself only drops the
zero-variance groups of the batch it is given (:func:`drop_zero_std`), since it has no env to
refill from. Metrics: ``completion/generated_tokens`` (every token the agent generated this step,
refills and dropped groups included: the sampling budget; with dynamic sampling off too),
``grpo/frac_reward_zero_std`` (share of zero-variance groups among all groups
drawn this step, refills included), ``grpo/refills`` (extra batches drawn) and ``grpo/groups``
(groups trained on).

Refills draw the env's next training batches (``env.reset()``) inside ``env.side_batch()``, which
puts the step's shared pending batch back afterwards, so the other agents of a population are
still scored on the same prompts. An env without ``side_batch`` (a multi-turn env) is only
filtered, never refilled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from llm_gym.algorithms.rollout.rollout import Rollout, rollout

__all__ = ["Sampled", "drop_zero_std", "informative_groups", "sample", "select_groups"]


def informative_groups(rewards: Tensor) -> Tensor:
    """Which groups have rewards that are not all equal.

    Args:
        rewards: ``[P, G]``.

    Returns:
        ``[P]`` bool, True where the group's rewards differ (a non-zero advantage exists).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    return rewards.amax(dim=1) != rewards.amin(dim=1)


def select_groups(batch: Rollout, keep: Sequence[int]) -> Rollout:
    """The rollout restricted to the groups (prompts) at indices ``keep``, in that order; metrics unchanged."""
    index = list(keep)

    def pick(items: Any) -> Any:
        return None if items is None else [items[i] for i in index]

    return replace(
        batch, completion_ids=pick(batch.completion_ids), action_masks=pick(batch.action_masks),
        rewards=batch.rewards[torch.as_tensor(index, dtype=torch.long)].reshape(len(index), batch.rewards.shape[1]),
        scores=pick(batch.scores) if batch.scores else [], texts=pick(batch.texts),
    )  # fmt: skip


def _concat(parts: Sequence[Rollout]) -> Rollout:
    """Groups of several rollouts (of the same group size) as one; metrics and turns of the first."""
    first = parts[0]
    if len(parts) == 1:
        return first
    masks = None if first.action_masks is None else [m for p in parts for m in p.action_masks]
    texts = None if first.texts is None else [t for p in parts for t in (p.texts or [])]
    return replace(
        first, completion_ids=[c for p in parts for c in p.completion_ids], action_masks=masks,
        rewards=torch.cat([p.rewards for p in parts], dim=0), scores=[s for p in parts for s in p.scores],
        texts=texts, turns=max(p.turns for p in parts),
    )  # fmt: skip


@dataclass
class Sampled:
    """One agent's training batch for a step.

    Attributes:
        batch: What to train on (``batch.experience``): informative groups only when dynamic
            sampling is on (unless none was found: then the first draw, unchanged).
        first: The rollout of the step's shared prompts, unfiltered (its metrics and samples are
            what the loop logs, comparable with and without dynamic sampling).
        metrics: ``completion/generated_tokens``; with dynamic sampling also
            ``grpo/frac_reward_zero_std``, ``grpo/refills``, ``grpo/groups``.
    """

    batch: Rollout
    first: Rollout
    metrics: dict[str, float]


def sample(agent: Any, env: Any, prompts: Sequence[dict[str, Any]], first: Rollout | None = None) -> Sampled:
    """Roll ``agent`` out on ``prompts``; with dynamic sampling, drop zero-variance groups and refill.

    The target is ``len(prompts)`` informative groups. Each refill draws one more training batch of
    the env (at most ``agent.hps.max_refills``); surplus groups of the last draw are cut off.

    Args:
        agent: A GRPO agent (reads ``hps.dynamic_sampling`` and ``hps.max_refills``).
        env: The batched environment whose pending batch ``prompts`` is.
        prompts: The step's prompts (shared by every agent of the population).
        first: The agent's rollout of ``prompts`` when it was already made (a population's batched
            decode, :func:`~llm_gym.algorithms.rollout.population.population_rollouts`); None rolls
            the agent out here. Refills are always the agent's own.

    Returns:
        The :class:`Sampled` batch.
    """
    if first is None:
        first = rollout(agent, env, prompts)
    hps = agent.hps
    if not getattr(hps, "dynamic_sampling", False):
        return Sampled(first, first, {"completion/generated_tokens": _generated_tokens(first)})
    target = first.num_prompts
    kept: list[Rollout] = []
    found, drawn, zero, refills, tokens = 0, 0, 0, 0, _generated_tokens(first)
    draw = first
    side_batch = getattr(env, "side_batch", None)
    while True:
        mask = informative_groups(draw.rewards)
        drawn += draw.num_prompts
        zero += int((~mask).sum())
        keep = mask.nonzero().squeeze(1).tolist()[: target - found]
        if keep:
            kept.append(select_groups(draw, keep))
            found += len(keep)
        if found >= target or refills >= hps.max_refills or side_batch is None:
            break
        with side_batch():
            more = env.reset()
            draw = rollout(agent, env, more)
        refills += 1
        tokens += _generated_tokens(draw)
    batch = _concat(kept) if kept else first
    metrics = {"completion/generated_tokens": tokens, "grpo/frac_reward_zero_std": zero / drawn, "grpo/refills": float(refills), "grpo/groups": float(found)}
    return Sampled(batch, first, metrics)


def _generated_tokens(batch: Rollout) -> float:
    """Tokens the policy generated in ``batch`` (its action masks; 0 for a text policy)."""
    if batch.action_masks is None:
        return 0.0
    return float(sum(int(m.sum()) for m in batch.action_masks))


def drop_zero_std(
    experiences: tuple[Sequence[Tensor], Sequence[Tensor], Tensor],
) -> tuple[tuple[Sequence[Tensor], Sequence[Tensor], Tensor], float]:
    """``(completion_ids, action_masks, rewards)`` without its zero-variance groups (all of it if none varies).

    Args:
        experiences: Per prompt ids and masks, and the rewards ``[P, G]``.

    Returns:
        The filtered experience and the share of zero-variance groups in the input.
    """
    ids, masks, rewards = experiences
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    mask = informative_groups(rewards)
    share = float((~mask).float().mean()) if mask.numel() else 0.0
    if bool(mask.all()) or not bool(mask.any()):
        return (ids, masks, rewards), share
    keep = mask.nonzero().squeeze(1).tolist()
    return ([ids[i] for i in keep], [masks[i] for i in keep], rewards[mask]), share
