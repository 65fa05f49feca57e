"""TicTacToe for the trainer: a batched env of token-id episodes, SFT examples, per-opponent results.

* :func:`make_training_env` wraps the game in a :class:`~llm_gym.multi_turn.MultiTurnGym`: every
  training batch of B prompts is spread over opponent-strength buckets (:func:`stratified_setups`),
  the G rollouts of a prompt share its game and opponent; the held-out prompts are test games
  ``0 .. n-1`` against the optimal and the random opponent, interleaved (so every even-sized
  evaluation batch holds both, and per-opponent means stay exact).
* :func:`sft_examples`: the teacher's games, filtered (won or drawn, format 1), as multi-turn
  :class:`~llm_gym.multi_turn.ConversationExample` (every assistant turn trained, nothing else).
* :func:`stats_from_records`: win / draw / loss and invalid moves per opponent from the env's
  finished episodes (the model's counterpart of :func:`evaluate_player`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llm_gym.multi_turn import ConversationExample, EpisodeRecord, MultiTurnGym, MultiTurnRecipe
from llm_gym.tasks.tictactoe.env import ENV_ID, TicTacToeConfig, TicTacToeEnv
from llm_gym.tasks.tictactoe.game import Player
from llm_gym.tasks.tictactoe.play import (
    OPPONENTS,
    GameRecord,
    GameStats,
    evaluate_player,
    stats_table,
    stratified_setups,
    teacher_conversations,
)

__all__ = ["RECIPE", "game_metrics", "make_training_env", "sft_examples", "stats_from_records", "held_out_options"]


def held_out_options(num_games: int) -> list[dict[str, Any]]:
    """Held-out prompts: test game ``k`` against the optimal opponent, then against the random one, for each ``k``."""
    return [{"index": k, "random_move_prob": p} for k in range(num_games) for p in (OPPONENTS["optimal"],
                                                                                     OPPONENTS["random"])]


def _record(record: EpisodeRecord) -> GameRecord:
    info = record.info
    outcome = info.get("outcome", "loss")  # an episode the rollout stopped early counts as lost
    return GameRecord(
        messages=tuple(record.observation["messages"]), outcome=outcome, rewards=dict(info.get("rewards", {})),
        reward=record.reward, invalid_moves=int(info["invalid_moves"]), turns=record.turns, mark=info["mark"],
        random_move_prob=float(record.options.get("random_move_prob", -1.0)), truncated=record.truncated or not record.done,
    )  # fmt: skip


def stats_from_records(records: Sequence[EpisodeRecord]) -> dict[str, GameStats]:
    """:class:`GameStats` per evaluation opponent (``"random"``, ``"optimal"``) of finished episodes."""
    games = [_record(r) for r in records]
    return {
        name: GameStats.from_records([g for g in games if g.random_move_prob == p])
        for name, p in OPPONENTS.items()
        if any(g.random_move_prob == p for g in games)
    }


def game_metrics(records: Sequence[EpisodeRecord]) -> dict[str, float]:
    """Outcome shares of a batch (``game/win``, ``game/draw``, ``game/loss``, ``game/invalid_games``),
    and against the evaluation opponents ``optimal/not_lost`` (draws + wins) and ``random/win``."""
    games = [_record(r) for r in records]
    outcomes = [g.outcome for g in games]
    metrics = {f"game/{o}": outcomes.count(o) / len(games) for o in ("win", "draw", "loss")}
    metrics["game/invalid_games"] = float(np.mean([g.invalid_moves > 0 for g in games]))
    stats = stats_from_records(records)
    if "optimal" in stats:
        metrics["optimal/not_lost"] = stats["optimal"].win_rate + stats["optimal"].draw_rate
    if "random" in stats:
        metrics["random/win"] = stats["random"].win_rate
    return metrics


def make_training_env(
    tokenizer: Any,
    *,
    data_batch_size_per_gpu: int = 8,
    test_games: int = 50,
    train_size: int = 1000,
    seed: int = 0,
    buckets: int | Sequence[tuple[float, float]] | None = None,
    **knobs: Any,
) -> MultiTurnGym:
    """The game as a batched multi-turn env for GRPO (``finetune_llm_reasoning``, ``agent.test``).

    Args:
        tokenizer: The model's tokenizer.
        data_batch_size_per_gpu: Prompts (games) per batch, B.
        test_games: Held-out games; each is played against the optimal and the random opponent.
        train_size: Games in the training split.
        seed: Seed of both splits' games and of the batches' setups.
        buckets: Opponent-strength buckets of a training batch (default one per prompt).
        **knobs: :class:`~llm_gym.tasks.tictactoe.env.TicTacToeConfig` fields (``max_turns``, weights).

    Returns:
        The env; its fitness (``reward/total``) mixes both evaluation opponents, and its metrics
        add :func:`game_metrics`.
    """
    config = TicTacToeConfig(**knobs)
    sizes = {"train": train_size, "test": test_games}

    def make_env(split: str) -> TicTacToeEnv:
        return TicTacToeEnv(split=split, size=sizes[split], seed=seed, **knobs)

    def train_options(batch: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng([seed, batch])
        setups = stratified_setups(data_batch_size_per_gpu, buckets=buckets, size=train_size, rng=rng)
        return [s.options() for s in setups]

    return MultiTurnGym(
        make_env, tokenizer, train_options=train_options, test_options=held_out_options(test_games),
        data_batch_size_per_gpu=data_batch_size_per_gpu, num_train=train_size, max_turns=config.max_turns,
        metrics_fn=game_metrics, env_id=ENV_ID,
    )  # fmt: skip


def sft_examples(num_games: int, *, seed: int = 0, **kwargs: Any) -> list[ConversationExample]:
    """Multi-turn SFT examples: the teacher's kept games (:func:`teacher_conversations`'s arguments)."""
    return [ConversationExample(tuple(c)) for c in teacher_conversations(num_games, seed=seed, **kwargs)]


def _report(records: Sequence[EpisodeRecord]) -> str:
    return stats_table(stats_from_records(records))


def _oracle_report(num_games: int, *, seed: int = 0, **knobs: Any) -> str:
    return stats_table(evaluate_player(Player(seed=seed), num_games=num_games, seed=seed, **knobs))


RECIPE = MultiTurnRecipe(
    tokenizer_env_ids=(ENV_ID,), sft_examples=sft_examples, make_env=make_training_env, report=_report,
    oracle_report=_oracle_report,
    sft_seq_len=1024, max_model_len=1024,
)
"""How ``llm-gym train --task llm_gym/TicTacToe-v0`` trains the game."""
