"""Multi-turn envs (``llm_gym/TicTacToe-v0``) through an endpoint: one rollout record per episode.

Each episode is a coroutine: ask the endpoint for the model's turn, step the env with it, and so
on until the episode ends, many episodes at once under the endpoint's concurrency limit. A turn
whose request still fails after its retries ends the episode as *failed* (counted, not scored).
A finished episode becomes a :class:`~llm_gym.rollout_record.RolloutRecord` like a single-turn
answer: ``prompt`` is the conversation before the model's first turn, ``completion_messages`` the
rest up to the model's last turn, ``reward`` the episode's return, ``parts`` the env's
``info["rewards"]``, and ``correct`` a win (``info["outcome"] == "win"``). So the report, the
rollout log, ``--resume``, the cache and ``--save-dataset`` work the same as for a task.

An env is evaluated on its split's episodes ``0 .. n-1`` (``reset(options={"index": i})``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from llm_gym.endpoint import Answer, gather_or_cancel
from llm_gym.rollout_record import RolloutRecord, failed_record, jsonable

__all__ = ["episode_record", "play_episodes"]

Ask = Callable[[Any, Sequence[Mapping[str, str]], int], Awaitable[Answer]]
"""``ask(key, messages, sample) -> Answer``: one model turn (through the cache and the endpoint)."""


def episode_record(
    index: int, sample: int, messages: Sequence[Mapping[str, str]], total: float, info: Mapping[str, Any],
    completion_tokens: int | None = None,
) -> RolloutRecord:
    """The record of a finished episode.

    Args:
        index: Episode index in the split.
        sample: Which of its ``R`` samples.
        messages: The whole conversation (the env's closing message, if any, is dropped).
        total: The episode's return.
        info: The env's last info (``rewards`` per part, ``outcome``, counters).
        completion_tokens: The model's tokens over all its turns, when known.

    Returns:
        The record; the info's scalar fields other than the rewards become its columns.
    """
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    first, last = (turns[0], turns[-1]) if turns else (len(messages), len(messages) - 1)
    columns = {"episode": index, **{k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}}
    return RolloutRecord(
        problem=index, sample=sample, prompt=[dict(m) for m in messages[:first]],
        completion=messages[last]["content"] if turns else "", reward=float(total),
        correct=info.get("outcome") == "win", parts={k: float(v) for k, v in dict(info.get("rewards", {})).items()},
        completion_tokens=completion_tokens, columns=jsonable(columns),
        completion_messages=[dict(m) for m in messages[first : last + 1]],
    )  # fmt: skip


async def play_episodes(
    make_env: Callable[[], Any],
    keys: Sequence[tuple[int, int]],
    ask: Ask,
    on_record: Callable[[RolloutRecord], None],
    max_turns: int = 1000,
) -> None:
    """Play the episodes ``keys`` (``(index, sample)``) to their end, concurrently.

    Args:
        make_env: A fresh env (one per episode).
        keys: The episodes to play.
        ask: One model turn.
        on_record: Called with each episode's record (finished or failed) as it ends.
        max_turns: Safety cap on model turns (envs end episodes themselves).
    """

    async def episode(index: int, sample: int) -> None:
        env = make_env()
        obs, info = env.reset(options={"index": index})
        total, tokens, known = 0.0, 0, True
        for _ in range(max_turns):
            answer = await ask((index, sample), obs["messages"], sample)
            if answer.error is not None:
                on_record(failed_record(index, sample, {"episode": index}, obs["messages"], answer.error))
                return
            tokens += answer.completion_tokens or 0
            known = known and answer.completion_tokens is not None
            obs, reward, terminated, truncated, info = env.step(answer.text or "")
            total += float(reward)
            if terminated or truncated:
                on_record(episode_record(index, sample, obs["messages"], total, info, tokens if known else None))
                return
        raise RuntimeError(f"episode {index} still running after {max_turns} model turns")

    await gather_or_cancel([episode(i, s) for i, s in keys])
