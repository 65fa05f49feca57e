"""Playing many TicTacToe games: training batches, SFT data from filtered games, evaluation.

* **Training batches.** :func:`stratified_setups` picks the B prompts of a batch and spreads them
  over opponent-strength buckets (``random_move_prob`` ranges), so every batch mixes weak and
  strong opponents; :func:`make_batch` builds the B x G episodes, all G rollouts of a prompt
  sharing its game (episode seed) and its opponent. The result is an
  :class:`~llm_gym.episodes.EpisodeBatch`: step it with one completion per active episode.
* **SFT data.** :func:`teacher_conversations` lets a teacher (the oracle with noise) play the
  stratified opponents and keeps the games won or drawn with format 1 (the course's
  ``win_reward > 0 and format == 1``), as chat conversations ending on the last assistant turn.
* **Evaluation.** :func:`evaluate_player` plays any text policy on held-out games against a
  random and an optimal opponent: win / draw / loss and invalid-move rates (:class:`GameStats`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from llm_gym.episodes import EpisodeBatch, TextPolicy, play
from llm_gym.tasks.tictactoe.env import TicTacToeEnv
from llm_gym.tasks.tictactoe.game import Player

__all__ = [
    "OPPONENTS", "GameRecord", "GameSetup", "GameStats", "batch_options", "evaluate_player", "game_records",
    "keep_for_sft", "make_batch", "play_games", "sft_conversation", "stats_table", "stratified_setups",
    "strength_buckets", "teacher_conversations",
]

logger = logging.getLogger(__name__)

OPPONENTS = MappingProxyType({"random": 1.0, "optimal": 0.0})
"""The evaluation opponents by name: their ``random_move_prob``."""


@dataclass(frozen=True)
class GameSetup:
    """One prompt of a batch: a game of the split and the strength of its opponent."""

    index: int
    """Game index in the split (it fixes the episode seed, hence who starts and every tie-break)."""
    random_move_prob: float
    """The opponent's chance of a random legal move."""

    def options(self) -> dict[str, Any]:
        """The ``reset`` options that start this game."""
        return {"index": self.index, "random_move_prob": self.random_move_prob}


def strength_buckets(count: int, low: float = 0.0, high: float = 1.0) -> list[tuple[float, float]]:
    """``count`` equal ``random_move_prob`` ranges covering ``[low, high]``, strongest opponent first.

    >>> strength_buckets(4)
    [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    """
    if count < 1 or not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need count >= 1 and 0 <= low <= high <= 1, got count={count}, low={low}, high={high}")
    edges = np.linspace(low, high, count + 1)
    return [(float(a), float(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def stratified_setups(
    num_prompts: int,
    *,
    buckets: int | Sequence[tuple[float, float]] | None = None,
    size: int = 1000,
    rng: np.random.Generator | int = 0,
) -> list[GameSetup]:
    """The B prompts of a training batch, spread evenly over opponent-strength buckets.

    Prompt ``b`` falls in bucket ``b * K // B`` of the ``K`` buckets (each bucket gets ``B / K``
    prompts, or when ``B < K`` the prompts are spread across the whole range) and draws its
    ``random_move_prob`` uniformly inside it. The games are distinct when the split has enough.

    Args:
        num_prompts: B, the prompts of the batch.
        buckets: ``random_move_prob`` ranges, or their number over ``[0, 1]``; default one per prompt
            (the course's ``num_groups = batch_size // rollouts_per_example``).
        size: Games in the split the env draws from (its ``size``).
        rng: A generator or a seed.

    Returns:
        One :class:`GameSetup` per prompt, weakest-last.

    Raises:
        ValueError: for no prompts or a range outside ``[0, 1]``.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be at least 1, got {num_prompts}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if buckets is None or isinstance(buckets, int):
        ranges = strength_buckets(num_prompts if buckets is None else buckets)
    else:
        ranges = [(float(lo), float(hi)) for lo, hi in buckets]
    if not ranges or not all(0.0 <= lo <= hi <= 1.0 for lo, hi in ranges):
        raise ValueError(f"buckets must be [low, high] ranges with 0 <= low <= high <= 1, got {buckets!r}")
    indices = rng.choice(size, num_prompts, replace=num_prompts > size)
    setups = []
    for b, index in enumerate(indices):
        lo, hi = ranges[b * len(ranges) // num_prompts]
        setups.append(GameSetup(int(index), lo if lo == hi else float(rng.uniform(lo, hi))))
    return setups


def batch_options(setups: Sequence[GameSetup], group_size: int) -> list[dict[str, Any]]:
    """``reset`` options of the B x G episodes, prompt-major: rollout ``g`` of prompt ``b`` is ``b * G + g``."""
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    return [setup.options() for setup in setups for _ in range(group_size)]


def make_batch(setups: Sequence[GameSetup], group_size: int = 1, **env_kwargs: Any) -> EpisodeBatch:
    """The B x G episodes of a batch, reset and ready to step.

    Args:
        setups: The B prompts (:func:`stratified_setups`).
        group_size: G, rollouts per prompt; they share the prompt's game and opponent.
        **env_kwargs: :class:`~llm_gym.tasks.tictactoe.env.TicTacToeEnv` arguments (``split``, ``size``,
            ``seed``, ``tokenizer``, knobs), the same for every episode.

    Returns:
        The reset batch (episode ``b * G + g`` is rollout ``g`` of prompt ``b``). Reuse its envs for
        the next batch with ``batch.reset(options=batch_options(new_setups, G))``.
    """
    options = batch_options(setups, group_size)
    batch = EpisodeBatch([TicTacToeEnv(**env_kwargs) for _ in options])
    batch.reset(options=options)
    return batch


@dataclass(frozen=True)
class GameRecord:
    """A finished game."""

    messages: tuple[dict[str, str], ...]
    """The whole conversation, the env's final message included."""
    outcome: str
    """``"win"``, ``"draw"`` or ``"loss"``."""
    rewards: dict[str, float]
    """The rubric's parts."""
    reward: float
    """The episode's return (the weighted total)."""
    invalid_moves: int
    """Invalid moves the model made."""
    turns: int
    """Turns the model took."""
    mark: str
    """The model's mark."""
    random_move_prob: float
    """The opponent's strength."""
    truncated: bool
    """Whether the turn cap ended the game."""


def game_records(batch: EpisodeBatch) -> list[GameRecord]:
    """The finished games of a batch of TicTacToe episodes.

    Raises:
        ValueError: if an episode is still running.
    """
    if batch.active:
        raise ValueError(f"{len(batch.active)} games are still running: play them to the end first")
    records = []
    for i, (obs, info) in enumerate(zip(batch.observations, batch.infos, strict=True)):
        records.append(GameRecord(
            messages=tuple(obs["messages"]), outcome=info["outcome"], rewards=dict(info["rewards"]),
            reward=batch.returns[i], invalid_moves=info["invalid_moves"], turns=batch.turns[i], mark=info["mark"],
            random_move_prob=batch.envs[i].unwrapped.random_move_prob, truncated=batch.truncated[i],
        ))
    return records


def play_games(
    policy: TextPolicy, setups: Sequence[GameSetup], *, group_size: int = 1, **env_kwargs: Any
) -> list[GameRecord]:
    """Play every game of ``setups`` (``group_size`` times each) to the end with ``policy``.

    Args:
        policy: The text policy (a :class:`~llm_gym.tasks.tictactoe.game.Player`, or a model wrapper).
        setups: The games.
        group_size: Rollouts per game.
        **env_kwargs: Env arguments, as for :func:`make_batch`.

    Returns:
        One record per episode, prompt-major.
    """
    return game_records(play(make_batch(setups, group_size, **env_kwargs), policy))


def keep_for_sft(records: Sequence[GameRecord]) -> list[GameRecord]:
    """The games won or drawn with every turn well formatted (the course's ``win_reward > 0 and format == 1``)."""
    return [r for r in records if r.rewards["outcome"] > 0 and r.rewards["format"] == 1.0]


def sft_conversation(record: GameRecord) -> list[dict[str, str]]:
    """The game as chat messages ending on the model's last turn (the env's closing message dropped)."""
    last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
    return [dict(m) for m in record.messages[: last + 1]]


def teacher_conversations(
    num_games: int,
    *,
    teacher: TextPolicy | None = None,
    seed: int = 0,
    buckets: int | Sequence[tuple[float, float]] | None = 10,
    size: int = 1000,
    **env_kwargs: Any,
) -> list[list[dict[str, str]]]:
    """SFT conversations: a teacher plays stratified train games; the wins and draws with format 1 are kept.

    Args:
        num_games: Games played (fewer are kept).
        teacher: The player; default :meth:`Player.teacher(seed) <llm_gym.tasks.tictactoe.game.Player.teacher>`.
        seed: Seed of the games (the split's ``seed``) and of their setups.
        buckets: Opponent-strength buckets, as for :func:`stratified_setups`.
        size: Games in the train split to draw from.
        **env_kwargs: Other env arguments (knobs such as ``max_turns``).

    Returns:
        The kept games as conversations (:func:`sft_conversation`); a log line gives how many were kept.
    """
    teacher = Player.teacher(seed=seed) if teacher is None else teacher
    setups = stratified_setups(num_games, buckets=buckets, size=size, rng=seed)
    records = play_games(teacher, setups, split="train", size=size, seed=seed, **env_kwargs)
    kept = keep_for_sft(records)
    logger.info("kept %d of %d teacher games (won or drawn, format 1)", len(kept), len(records))
    return [sft_conversation(r) for r in kept]


@dataclass(frozen=True)
class GameStats:
    """Results of a policy over a set of games."""

    games: int
    wins: int
    draws: int
    losses: int
    invalid_games: int
    """Games with at least one invalid move."""
    invalid_moves: int
    turns: int
    """Model turns in all the games."""
    mean_reward: float

    @classmethod
    def from_records(cls, records: Sequence[GameRecord]) -> GameStats:
        """Count the outcomes of finished games."""
        outcomes = [r.outcome for r in records]
        return cls(
            games=len(records), wins=outcomes.count("win"), draws=outcomes.count("draw"),
            losses=outcomes.count("loss"), invalid_games=sum(r.invalid_moves > 0 for r in records),
            invalid_moves=sum(r.invalid_moves for r in records), turns=sum(r.turns for r in records),
            mean_reward=float(np.mean([r.reward for r in records])) if records else 0.0,
        )

    def _share(self, n: int) -> float:
        return n / self.games if self.games else 0.0

    @property
    def win_rate(self) -> float:
        """Share of games won."""
        return self._share(self.wins)

    @property
    def draw_rate(self) -> float:
        """Share of games drawn."""
        return self._share(self.draws)

    @property
    def loss_rate(self) -> float:
        """Share of games lost (turn cap included)."""
        return self._share(self.losses)

    @property
    def invalid_game_rate(self) -> float:
        """Share of games with an invalid move."""
        return self._share(self.invalid_games)

    @property
    def invalid_move_rate(self) -> float:
        """Invalid moves per model turn."""
        return self.invalid_moves / self.turns if self.turns else 0.0


def evaluate_player(
    policy: TextPolicy,
    *,
    num_games: int = 100,
    opponents: Mapping[str, float] = OPPONENTS,
    seed: int = 0,
    split: str = "test",
    **env_kwargs: Any,
) -> dict[str, GameStats]:
    """Play a text policy on held-out games against each opponent.

    Against every opponent the policy plays games ``0 .. num_games - 1`` of the split (the same
    episode seeds, so the same starting player in each game).

    Args:
        policy: The text policy.
        num_games: Games per opponent.
        opponents: Name to ``random_move_prob``; default :data:`OPPONENTS` (random 1.0, optimal 0.0).
        seed: Seed of the split's games.
        split: ``"test"`` (held out from training) or ``"train"``.
        **env_kwargs: Other env arguments (``tokenizer`` for a model policy, knobs).

    Returns:
        The stats per opponent name.
    """
    results = {}
    for name, p in opponents.items():
        setups = [GameSetup(i, float(p)) for i in range(num_games)]
        results[name] = GameStats.from_records(
            play_games(policy, setups, split=split, size=num_games, seed=seed, **env_kwargs)
        )
    return results


def stats_table(results: Mapping[str, GameStats]) -> str:
    """A plain-text table of :func:`evaluate_player` results (rates in %)."""
    header = (
        f"{'opponent':<10} {'games':>5} {'win %':>6} {'draw %':>6} {'loss %':>6} "
        f"{'invalid games %':>15} {'invalid/turn %':>14}"
    )
    rows = [
        f"{name:<10} {s.games:>5} {100 * s.win_rate:>6.1f} {100 * s.draw_rate:>6.1f} {100 * s.loss_rate:>6.1f} "
        f"{100 * s.invalid_game_rate:>15.1f} {100 * s.invalid_move_rate:>14.1f}"
        for name, s in results.items()
    ]
    return "\n".join([header, *rows])
