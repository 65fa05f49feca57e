"""Multi-turn episodes: generate -> environment step -> generate ..., batched over prompts x group.

An episode of a multi-turn environment (a game, a tool call, feedback on an answer) is several model
turns. :func:`run_episodes` plays ``P * G`` of them at once: the first turn samples ``G``
completions per prompt in one call (the prompt's KV cache shared by its group, as for single-turn
tasks), then every later turn generates one completion for each trajectory still running, again in
one batched call. Between turns the environment answers each trajectory with the token ids to
append (its next message, rendered by the chat template, and the assistant header) or ends it.

The trajectory is built from token ids turn by turn: the model's tokens exactly as sampled, the
environment's exactly as it returned them, never by re-tokenising the rendered conversation (a chat
template that drops earlier ``<think>`` blocks would break the prefix). The action mask is True on
the model's tokens only, so the loss never trains the environment's or the template's tokens, and
the whole trajectory gets one reward, hence one advantage from its group.

Any environment with the members of :class:`MultiTurnEnv` plugs in; it owns its tokenizer, its
rules and its scoring. :class:`llm_gym.multi_turn.MultiTurnGym` makes one of any multi-turn
Gymnasium text env (``llm_gym/TicTacToe-v0``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from llm_gym.multi_turn import EnvTurn  # defined in the core: envs there answer with it

__all__ = ["EnvTurn", "Episodes", "MultiTurnEnv", "play_held_out", "run_episodes"]


@runtime_checkable
class MultiTurnEnv(Protocol):
    """A batched environment whose episodes take several model turns.

    It serves batches of prompts like :class:`~llm_gym.reasoning_gym.ReasoningGym` (``reset``,
    ``eval_mode``, ``num_problems``, ``last_metrics``), and plays the pending batch's episodes:
    trajectory ``r = p * G + g`` is group member ``g`` of prompt ``p``.

    Attributes:
        max_turns: Model turns after which the rollout stops an episode that is still running;
            :meth:`finish_episodes` scores it as it stands.
    """

    max_turns: int

    def reset(self, reset_dataloaders: bool = False) -> list[dict[str, Any]]:
        """The next batch of prompts (``input_ids`` ``[1, L]``) of the current split."""
        ...

    def start_episodes(self, group_size: int) -> None:
        """Begin ``G`` episodes per pending prompt; the ``G`` episodes of a prompt share its problem and seed."""
        ...

    def step_episodes(self, turns: Mapping[int, Sequence[int]]) -> Mapping[int, EnvTurn]:
        """Apply each running trajectory's latest model turn (its generated ids, up to and including EOS).

        Returns:
            One :class:`EnvTurn` per trajectory of ``turns``.
        """
        ...

    def finish_episodes(self) -> Tensor:
        """Score the episodes of the pending batch: rewards ``[P, G]``, one per trajectory."""
        ...

    def last_metrics(self) -> dict[str, float]:
        """Mean rewards of the last finished batch (``reward/total``, ``reward/<part>``, ...)."""
        ...

    def eval_mode(self) -> AbstractContextManager[None]:
        """Serve the held-out split inside the ``with`` block."""
        ...

    def num_problems(self, split: str | None = None) -> int:
        """Problems of ``split`` (default: the current one)."""
        ...


@dataclass
class Episodes:
    """The played episodes of one batch, in the per-prompt completion format of the update.

    Attributes:
        completion_ids: Per prompt ``[G, S_i]``: prompt, then model and environment turns, right-padded.
        action_masks: Per prompt ``[G, S_i - 1]`` bool, True where the next token is the model's.
        rewards: ``[P, G]``.
        turns: Model turns played in the longest episode.
    """

    completion_ids: list[Tensor]
    action_masks: list[Tensor]
    rewards: Tensor
    turns: int


@dataclass
class _Trajectory:
    """One episode's ids as pieces, each owned by the model (trained) or not (prompt, environment)."""

    pieces: list[Tensor] = field(default_factory=list)
    model: list[bool] = field(default_factory=list)

    def add(self, ids: Tensor, by_model: bool) -> None:
        self.pieces.append(ids.reshape(-1).long().cpu())
        self.model.append(by_model)

    def __len__(self) -> int:
        return sum(len(p) for p in self.pieces)

    def ids(self) -> Tensor:
        return torch.cat(self.pieces)  # [S]

    def owner(self) -> Tensor:
        """``[S]`` bool: True on the model's tokens."""
        return torch.cat([torch.full((len(p),), m, dtype=torch.bool) for p, m in zip(self.pieces, self.model, strict=True)])

    def prompt(self) -> dict[str, Any]:
        ids = self.ids().unsqueeze(0)  # [1, S]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "text": None}


def _generated(ids: Tensor, mask: Tensor, prompt_len: int) -> Tensor:
    """The generated ids of one row ``[S]`` with action mask ``[S - 1]`` after a prompt of ``prompt_len`` ids."""
    return ids[prompt_len:][mask[prompt_len - 1 :]]


def _pack(trajectories: Sequence[_Trajectory], group_size: int, pad_token_id: int) -> tuple[list[Tensor], list[Tensor]]:
    completion_ids, action_masks = [], []
    for start in range(0, len(trajectories), group_size):
        group = trajectories[start : start + group_size]
        width = max(len(t.ids()) for t in group)
        ids = torch.full((group_size, width), pad_token_id, dtype=torch.long)  # [G, S]
        mask = torch.zeros((group_size, width - 1), dtype=torch.bool)  # [G, S - 1]
        for g, t in enumerate(group):
            row, owner = t.ids(), t.owner()
            ids[g, : len(row)] = row
            mask[g, : len(row) - 1] = owner[1:]  # logit position s predicts token s + 1
        completion_ids.append(ids)
        action_masks.append(mask)
    return completion_ids, action_masks


def run_episodes(policy: Any, env: MultiTurnEnv, prompts: Sequence[dict[str, Any]], *, training: bool = True) -> Episodes:
    """Play the pending batch's episodes to the end, all trajectories batched.

    Args:
        policy: Has ``get_action(prompts, training, group_size=None)`` (a GRPO agent), ``pad_token_id``
            and optionally ``max_model_len`` (a trajectory that fills it stops).
        env: The multi-turn environment, with ``prompts`` pending.
        prompts: The batch ``env.reset()`` returned.
        training: Sample ``G`` trajectories per prompt with the policy's settings; False: one greedy each.

    Returns:
        The :class:`Episodes`.
    """
    completion_ids, masks = policy.get_action(prompts, training=training)
    group_size = int(completion_ids[0].shape[0])
    env.start_episodes(group_size)
    trajectories, latest = [], {}
    for p, (ids, mask) in enumerate(zip(completion_ids, masks, strict=True)):
        prompt_len = int(torch.as_tensor(prompts[p]["input_ids"]).shape[-1])
        for g in range(group_size):
            t = _Trajectory()
            t.add(ids[g, :prompt_len], by_model=False)
            latest[len(trajectories)] = _generated(ids[g], mask[g], prompt_len)
            t.add(latest[len(trajectories)], by_model=True)
            trajectories.append(t)
    limit = getattr(policy, "max_model_len", None)
    turn = 1
    while latest:
        replies = env.step_episodes({r: ids.tolist() for r, ids in latest.items()})
        running = [r for r in sorted(latest) if not replies[r].done]
        if turn >= env.max_turns:
            break
        latest = {}
        for r in running:
            tokens = torch.as_tensor(list(replies[r].tokens), dtype=torch.long)
            if limit is None or len(trajectories[r]) + len(tokens) < limit:  # else the episode stops: no room left
                trajectories[r].add(tokens, by_model=False)
                latest[r] = tokens
        if latest:
            rows = sorted(latest)
            ids, masks = policy.get_action([trajectories[r].prompt() for r in rows], training=training, group_size=1)
            for r, row_ids, row_mask in zip(rows, ids, masks, strict=True):
                latest[r] = _generated(row_ids[0], row_mask[0], len(trajectories[r]))
                trajectories[r].add(latest[r], by_model=True)
            turn += 1
    rewards = env.finish_episodes()
    packed_ids, packed_masks = _pack(trajectories, group_size, int(policy.pad_token_id))
    return Episodes(packed_ids, packed_masks, torch.as_tensor(rewards, dtype=torch.float32), turn)


def play_held_out(policy: Any, env: Any, *, greedy: bool = True) -> list[Any]:
    """Play every held-out prompt of a multi-turn env once and return the finished episodes.

    The same episodes as :func:`~llm_gym.algorithms.rollout.rollout.evaluate` plays for fitness,
    for reports that need each episode (win / draw / loss per opponent) rather than means.

    Args:
        policy: As for :func:`run_episodes` (a GRPO agent, a ``ModelPolicy``).
        env: A multi-turn env keeping ``last_records`` (:class:`~llm_gym.multi_turn.MultiTurnGym`).
        greedy: One greedy episode per prompt; False samples with the policy's settings.

    Returns:
        One :class:`~llm_gym.multi_turn.EpisodeRecord` per held-out prompt (per sample when not greedy).
    """
    total = env.num_problems("test")
    records: list[Any] = []
    seen = 0
    with env.eval_mode():
        prompts = env.reset(reset_dataloaders=True)
        while True:
            run_episodes(policy, env, prompts, training=not greedy)
            records += env.last_records
            seen += len(prompts)
            if seen >= total:
                return records
            prompts = env.reset()
