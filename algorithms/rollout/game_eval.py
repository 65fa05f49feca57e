"""``llm-gym eval`` for multi-turn envs: the scripted oracle, a local model or an elite, on held-out episodes.

A model plays through the same batched episodes as training's fitness
(:func:`~llm_gym.algorithms.rollout.multi_turn.play_held_out` on the env's
:class:`~llm_gym.multi_turn.MultiTurnRecipe` env, greedy), and the env's recipe prints the table
(TicTacToe: win / draw / loss and invalid moves against the random and the optimal opponent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_gym.multi_turn import MultiTurnRecipe

__all__ = ["evaluate_multi_turn", "load_model_or_elite"]


def load_model_or_elite(path: str) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a model folder (or hub id), or from an elite.

    An elite folder (``adapter_config.json``) or a run's elite root (its best elite) loads with
    :func:`~llm_gym.algorithms.run.elites.load_elite`: the recorded base model under the adapter.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        from llm_gym.algorithms.run.elites import load_elite

        return load_elite(folder)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def evaluate_multi_turn(
    recipe: MultiTurnRecipe,
    *,
    model: str | None = None,
    num_games: int = 100,
    seed: int = 0,
    max_new_tokens: int = 48,
    **knobs: Any,
) -> str:
    """Play ``num_games`` held-out games per evaluation opponent and return the recipe's table.

    Args:
        recipe: The env's recipe.
        model: A model folder, hub id or elite folder; ``None`` plays the env's oracle.
        num_games: Held-out games (each against every evaluation opponent).
        seed: Seed of the held-out games.
        max_new_tokens: Generation budget per model turn.
        **knobs: The env's knobs.

    Returns:
        The table text.
    """
    if model is None:
        return recipe.oracle_report(num_games, seed=seed, **knobs)
    from llm_gym.algorithms.rollout.multi_turn import play_held_out
    from llm_gym.algorithms.rollout.policies import ModelPolicy

    lm, tokenizer = load_model_or_elite(model)
    policy = ModelPolicy(lm, tokenizer.pad_token_id, max_new_tokens)
    policy.max_model_len = recipe.max_model_len  # a trajectory that fills it is forfeited
    env = recipe.make_env(tokenizer, data_batch_size_per_gpu=16, test_games=num_games, seed=seed, **knobs)
    return recipe.report(play_held_out(policy, env))
