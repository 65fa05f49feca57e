"""Playing text environments in batches: many episodes stepped with lists of completions.

An :class:`EpisodeBatch` holds one Gymnasium env per episode (a multi-turn game such as
``llm_gym/TicTacToe-v0``, or a single-turn task env, which simply ends after one round). Each
round, the caller generates one completion per *active* (unfinished) episode and hands them to
:meth:`EpisodeBatch.step`; finished episodes keep their last observation, info and return::

    batch = EpisodeBatch([gym.make("llm_gym/TicTacToe-v0").unwrapped for _ in range(8)])
    observations, infos = batch.reset(seed=0)
    while batch.active:
        completions = policy([observations[i] for i in batch.active], [infos[i] for i in batch.active])
        observations, infos = batch.step(completions)

:func:`play` runs that loop for a text policy. The module also measures conversations in tokens
(:func:`length_summary`, the seed course's "98.28 % fit in 700") and cuts a conversation into one
prompt/completion pair per assistant turn (:func:`turn_examples`) for supervised warm-up. Nothing
here imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym

__all__ = ["EpisodeBatch", "LengthSummary", "TextPolicy", "length_summary", "play", "turn_examples"]

logger = logging.getLogger(__name__)

TextPolicy = Callable[[Sequence[dict[str, Any]], Sequence[dict[str, Any]]], list[str]]
"""``(observations, infos) -> completions``: one completion text per observation. A model uses the
observation (``messages`` or ``prompt``); scripted players may read the env's ``info``."""


class EpisodeBatch:
    """Several episodes of text environments, stepped together round by round.

    Args:
        envs: One env per episode (unwrapped or not); they must not be shared with other batches.

    Attributes:
        observations: The latest observation of every episode.
        infos: The latest info of every episode.
        returns: Sum of each episode's rewards so far.
        terminated: Whether each episode terminated.
        truncated: Whether each episode was truncated (e.g. a turn cap).
        turns: Completions each episode has taken.
    """

    def __init__(self, envs: Sequence[gym.Env]) -> None:
        if not envs:
            raise ValueError("an EpisodeBatch needs at least one env")
        self.envs = list(envs)
        n = len(self.envs)
        self.observations: list[dict[str, Any]] = [{} for _ in range(n)]
        self.infos: list[dict[str, Any]] = [{} for _ in range(n)]
        self.returns = [0.0] * n
        self.terminated = [False] * n
        self.truncated = [False] * n
        self.turns = [0] * n
        self._started = False

    def __len__(self) -> int:
        return len(self.envs)

    def reset(
        self,
        *,
        seed: int | Sequence[int | None] | None = None,
        options: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Reset every episode.

        Args:
            seed: One seed for all envs (env ``i`` gets ``seed + i``), one per env, or ``None``.
            options: One ``reset`` options mapping (or ``None``) per env.

        Returns:
            ``(observations, infos)``, one per episode.

        Raises:
            ValueError: if ``seed`` or ``options`` has the wrong length.
        """
        n = len(self.envs)
        if seed is None or isinstance(seed, int):
            seeds: list[int | None] = [None if seed is None else seed + i for i in range(n)]
        else:
            seeds = list(seed)
        opts = [None] * n if options is None else list(options)
        if len(seeds) != n or len(opts) != n:
            raise ValueError(f"got {len(seeds)} seeds and {len(opts)} options for {n} envs: give one per env")
        for i, env in enumerate(self.envs):
            option = None if opts[i] is None else dict(opts[i])
            self.observations[i], self.infos[i] = env.reset(seed=seeds[i], options=option)
        self.returns = [0.0] * n
        self.terminated = [False] * n
        self.truncated = [False] * n
        self.turns = [0] * n
        self._started = True
        return list(self.observations), list(self.infos)

    @property
    def done(self) -> list[bool]:
        """Whether each episode has ended (terminated or truncated)."""
        return [t or u for t, u in zip(self.terminated, self.truncated, strict=True)]

    @property
    def active(self) -> list[int]:
        """Indices of the episodes still running, in order: :meth:`step` takes one completion for each."""
        return [i for i, d in enumerate(self.done) if not d]

    def step(self, completions: Sequence[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Step every active episode with its completion.

        Args:
            completions: One text per index of :attr:`active`, in that order.

        Returns:
            ``(observations, infos)`` of *every* episode (finished ones unchanged).

        Raises:
            RuntimeError: before :meth:`reset`.
            ValueError: if the number of completions is not the number of active episodes.
        """
        if not self._started:
            raise RuntimeError("call reset() before step()")
        active = self.active
        if len(completions) != len(active):
            raise ValueError(
                f"got {len(completions)} completions for {len(active)} active episodes: "
                "pass one per index in batch.active, in order"
            )
        for i, text in zip(active, completions, strict=True):
            obs, reward, terminated, truncated, info = self.envs[i].step(text)
            self.observations[i], self.infos[i] = obs, info
            self.returns[i] += float(reward)
            self.terminated[i], self.truncated[i] = bool(terminated), bool(truncated)
            self.turns[i] += 1
        return list(self.observations), list(self.infos)


def play(batch: EpisodeBatch, policy: TextPolicy, *, max_rounds: int = 1000) -> EpisodeBatch:
    """Run every active episode of ``batch`` to its end with ``policy``.

    The policy is called once per round with the observations and infos of the active episodes.

    Args:
        batch: A batch that has been reset.
        policy: The text policy.
        max_rounds: Safety cap on rounds (envs should end episodes themselves).

    Returns:
        ``batch``, finished.

    Raises:
        RuntimeError: if episodes are still running after ``max_rounds`` rounds.
    """
    for _ in range(max_rounds):
        active = batch.active
        if not active:
            return batch
        completions = policy([batch.observations[i] for i in active], [batch.infos[i] for i in active])
        batch.step(completions)
    if batch.active:
        raise RuntimeError(f"{len(batch.active)} episodes still running after {max_rounds} rounds")
    return batch


@dataclass(frozen=True)
class LengthSummary:
    """Token lengths of a set of conversations under a chat template."""

    count: int
    """Number of conversations."""
    longest: int
    """Longest conversation, in tokens."""
    mean: float
    """Mean length, in tokens."""
    seq_len: int
    """The sequence length checked."""
    fit: int
    """Conversations of at most ``seq_len`` tokens."""

    @property
    def fit_fraction(self) -> float:
        """Share of conversations that fit ``seq_len`` untruncated."""
        return self.fit / self.count if self.count else 1.0

    def __str__(self) -> str:
        return (
            f"longest conversation {self.longest} tokens (mean {self.mean:.1f}); "
            f"{100 * self.fit_fraction:.2f} % of {self.count} fit in {self.seq_len}"
        )


def length_summary(
    conversations: Sequence[Sequence[Mapping[str, str]]], tokenizer: Any, seq_len: int
) -> LengthSummary:
    """How long conversations are in tokens, and how many fit ``seq_len`` (logged).

    Each conversation is tokenized whole with ``tokenizer.apply_chat_template`` (as the seed
    course counts them).

    Args:
        conversations: Lists of role/content messages.
        tokenizer: A tokenizer with a chat template.
        seq_len: The training sequence length considered.

    Returns:
        The summary; ``str(summary)`` reads "longest conversation 311 tokens (mean 240.2); 98.28 % of
        174 fit in 700".
    """
    lengths = [
        len(_token_ids(tokenizer.apply_chat_template([dict(m) for m in conv], tokenize=True))) for conv in conversations
    ]
    summary = LengthSummary(
        count=len(lengths),
        longest=max(lengths, default=0),
        mean=sum(lengths) / len(lengths) if lengths else 0.0,
        seq_len=seq_len,
        fit=sum(n <= seq_len for n in lengths),
    )
    logger.info("%s", summary)
    return summary


def _token_ids(encoded: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    return list(encoded)


def turn_examples(conversation: Sequence[Mapping[str, str]], tokenizer: Any) -> list[tuple[str, str]]:
    """One ``(prompt, completion)`` pair per assistant turn of a conversation.

    The prompt is the conversation before that turn rendered by the chat template with the
    generation prompt, exactly what the model saw when it wrote the turn; the completion is the
    turn's text. Pairs like these train with a single-turn supervised routine (wrap each in
    ``llm_gym.algorithms.sft.SFTExample``).

    Args:
        conversation: Role/content messages.
        tokenizer: A tokenizer with a chat template.

    Returns:
        The pairs, in turn order.
    """
    messages = [dict(m) for m in conversation]
    return [
        (tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True), m["content"])
        for i, m in enumerate(messages)
        if m["role"] == "assistant" and i > 0
    ]
