"""TicTacToe for the trainer: stratified batches of token-id prompts, shared groups, held-out setups,
forfeit at the context length, per-opponent metrics, the recipe hook."""

from __future__ import annotations

import pytest

from llm_gym.multi_turn import ConversationExample, EpisodeRecord, multi_turn_recipe, prompt_ids
from llm_gym.tasks.tictactoe import ENV_ID, TicTacToeEnv
from llm_gym.tasks.tictactoe.training import (
    RECIPE,
    game_metrics,
    held_out_options,
    make_training_env,
    sft_examples,
    stats_from_records,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from llm_gym.tiny import tiny_model_path

    return AutoTokenizer.from_pretrained(tiny_model_path("tiny", env_ids=[ENV_ID]))


def test_held_out_setups_interleave_the_optimal_and_the_random_opponent():
    assert held_out_options(2) == [
        {"index": 0, "random_move_prob": 0.0}, {"index": 0, "random_move_prob": 1.0},
        {"index": 1, "random_move_prob": 0.0}, {"index": 1, "random_move_prob": 1.0},
    ]  # fmt: skip


def test_training_batches_are_stratified_reproducible_and_shared_by_each_group(tokenizer):
    env = make_training_env(tokenizer, data_batch_size_per_gpu=4, test_games=2, seed=3)
    prompts = env.reset()
    first = env._pending["train"]
    # prompt b draws its opponent from bucket b of [0, 1]: [0, .25), [.25, .5), [.5, .75), [.75, 1]
    for b, option in enumerate(first):
        assert b / 4 <= option["random_move_prob"] <= (b + 1) / 4
    env.reset()
    assert env._pending["train"] != first  # the next batch draws new games
    again = make_training_env(tokenizer, data_batch_size_per_gpu=4, test_games=2, seed=3)
    again.reset()
    assert again._pending["train"] == first  # batch k depends on (seed, k) only: a resumed run sees the same
    env.load_state_dict({"position": {"train": 0, "test": 0}})
    assert [p["input_ids"].tolist() for p in env.reset()] == [p["input_ids"].tolist() for p in prompts]
    env.start_episodes(3)
    for p, option in enumerate(first):
        games = [env._env("train", p * 3 + g).unwrapped for g in range(3)]
        assert {(g.episode_seed, g.random_move_prob) for g in games} == {
            (games[0].game(option["index"])[0], option["random_move_prob"])
        }
        messages = env._records[p * 3].observation["messages"]
        assert prompt_ids(messages, tokenizer) == prompts[p]["input_ids"][0].tolist()


def test_forfeit_ends_a_running_game_as_a_loss():
    env = TicTacToeEnv()
    env.reset(options={"index": 0, "random_move_prob": 0.0})
    env.step("no move")  # invalid: the game goes on
    reward, info = env.forfeit()
    # outcome 0 (loss) x 1.0 + format 0/1 x 0.2 + invalid once x -0.1
    assert reward == pytest.approx(-0.1) and info["outcome"] == "loss" and info["invalid_moves"] == 1
    with pytest.raises(RuntimeError, match="forfeit\\(\\) ends a running game"):
        env.forfeit()


def _record(p: float, outcome: str | None, invalid: int = 0) -> EpisodeRecord:
    info = {"board": "." * 9, "mark": "X", "invalid_moves": invalid}
    if outcome is not None:
        info.update(outcome=outcome, rewards={"outcome": {"win": 1.0, "draw": 0.5, "loss": 0.0}[outcome]})
    return EpisodeRecord(options={"index": 0, "random_move_prob": p}, observation={"messages": ()}, info=info,
                         turns=3, done=outcome is not None)  # fmt: skip


def test_game_metrics_per_opponent_by_hand():
    records = [_record(0.0, "draw"), _record(0.0, "loss", invalid=2), _record(1.0, "win"), _record(1.0, None),
               _record(0.5, "win")]  # fmt: skip
    metrics = game_metrics(records)
    # 5 games: wins 2, draws 1, losses 2 (the unfinished one counts as lost); 1 with an invalid move
    assert metrics == pytest.approx({"game/win": 0.4, "game/draw": 0.2, "game/loss": 0.4, "game/invalid_games": 0.2,
                                     "optimal/not_lost": 0.5, "random/win": 0.5})  # fmt: skip
    stats = stats_from_records(records)
    assert set(stats) == {"random", "optimal"} and stats["optimal"].invalid_moves == 2


def test_the_env_offers_its_recipe_and_sft_examples_are_whole_games():
    import llm_gym.tasks.tictactoe as package

    assert multi_turn_recipe(ENV_ID) is RECIPE is package.RECIPE and RECIPE.tokenizer_env_ids == (ENV_ID,)
    assert multi_turn_recipe("llm_gym/Countdown-v0") is None
    examples = sft_examples(20, seed=1)
    assert examples and all(isinstance(e, ConversationExample) for e in examples)
    assert all(e.messages[-1]["role"] == "assistant" for e in examples)


def test_the_env_module_never_imports_the_training_module():
    import ast
    from pathlib import Path

    import llm_gym.tasks.tictactoe.env as env_module

    tree = ast.parse(Path(env_module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(name.startswith("llm_gym.tasks.tictactoe.training") for name in imported)  # training imports env


def test_a_recipe_is_found_in_the_entry_points_own_module(monkeypatch):
    import sys
    import types

    import gymnasium as gym

    module = types.ModuleType("my_game")
    module.MyGame, module.RECIPE = TicTacToeEnv, RECIPE
    monkeypatch.setitem(sys.modules, "my_game", module)
    gym.register("test/MyGame-v0", entry_point="my_game:MyGame")
    try:
        assert multi_turn_recipe("test/MyGame-v0") is RECIPE
        module.RECIPE = "not a recipe"
        assert multi_turn_recipe("test/MyGame-v0") is None
    finally:
        del gym.registry["test/MyGame-v0"]
    with pytest.raises(gym.error.Error):
        multi_turn_recipe("test/MyGame-v0")
