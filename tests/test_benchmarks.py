"""Tests for the benchmark helpers that compute reported numbers (the timings themselves are not tested)."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.grpo_step import step_flops
from benchmarks.workload import Workload
from llm_gym.usage import UsageError


def test_step_flops_counts_each_prompt_once_and_three_update_passes():
    work = Workload(prompts_per_step=4, group_size=8, beta=0.04)
    # tokens the step needs: 4 prompts x 10 + 100 generated = 140; generation 2N, update 2N + 2N + 2N per token
    assert step_flops(1000, 10.0, work, 100.0) == pytest.approx(2 * 1000 * 140 + 6 * 1000 * 140)
    no_kl = dataclasses.replace(work, beta=0.0)  # no reference pass
    assert step_flops(1000, 10.0, no_kl, 100.0) == pytest.approx(2 * 1000 * 140 + 4 * 1000 * 140)



def test_seed_summary_by_hand():
    from benchmarks.learning import seed_summary

    # mean 3; sample variance ((1-3)^2 + (2-3)^2 + (6-3)^2) / 2 = 7; s.e. sqrt(7 / 3) = 1.527525
    assert seed_summary([1.0, 2.0, 6.0]) == {"seeds": 3, "mean": 3.0, "se": pytest.approx(1.527525, abs=1e-6)}


def test_generated_tokens_sums_every_agents_tokens_from_metrics_csv(tmp_path):
    from benchmarks.evolution import generated_tokens

    (tmp_path / "metrics.csv").write_text("step,key,value\n1,agent0/completion/generated_tokens,10\n"
                                          "1,agent1/completion/generated_tokens,5\n1,agent0/completion/length_mean,3\n"
                                          "2,agent0/completion/generated_tokens,2\n")  # fmt: skip
    assert generated_tokens(tmp_path) == 17.0


@pytest.mark.timeout(600)
def test_learning_benchmark_quick_mode_reports_gain_per_seed(tmp_path):
    from benchmarks.learning import main

    record = main(["--quick", "--seeds", "2", "--no-cache", "--results-dir", str(tmp_path)])
    assert [r["config"]["seed"] for r in record["seeds"]] == [0, 1]
    gains = [r["accuracy_gain_points"] for r in record["seeds"]]
    assert record["gain_points"]["mean"] == pytest.approx(sum(gains) / 2)
    table = (tmp_path / "learning_seeds.md").read_text()
    assert "| seed | SFT exact acc." in table and "mean gain over 2 seeds:" in table


@pytest.mark.timeout(600)
def test_evolution_benchmark_quick_mode_gives_both_arms_the_same_completions(tmp_path, monkeypatch):
    from benchmarks.evolution import main

    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    record = main(["--quick", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    (seed,) = record["seeds"]
    # quick: 2 agents x 2 steps vs 1 agent x 4 steps, each step 2 prompts x 4 completions of <= 12 tokens
    assert seed["evolution"]["agents_x_steps"] == "2 x 2" and seed["single"]["agents_x_steps"] == "1 x 4"
    for arm in ("evolution", "single"):
        assert 0 < seed[arm]["generated_tokens"] <= 4 * 2 * 4 * 12
    assert (tmp_path / "runs" / "evolution_s0" / "summary.json").is_file()
    assert (tmp_path / "runs" / "single_s0" / "summary.json").is_file()
    assert "evolution minus single agent:" in (tmp_path / "evolution.md").read_text()
    # the finished runs are reused (through the recipe's resume), not repeated; other settings are refused
    again = main(["--quick", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    assert again["seeds"][0]["evolution"] == seed["evolution"] and again["seeds"][0]["single"] == seed["single"]
    with pytest.raises(UsageError, match="lr=0.01 differs from the run's"):
        main(["--quick", "--set", "lr=0.01", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])


def test_tictactoe_rates_and_targets_by_hand():
    from benchmarks.tictactoe import _rates, targets
    from llm_gym.tasks.tictactoe import GameStats

    optimal = GameStats(games=10, wins=1, draws=8, losses=1, invalid_games=1, invalid_moves=2, turns=40, mean_reward=0.6)
    random = GameStats(games=10, wins=9, draws=0, losses=1, invalid_games=0, invalid_moves=0, turns=40, mean_reward=1.0)
    rates = _rates({"optimal": optimal, "random": random})
    # draws + wins vs optimal 9/10; wins vs random 9/10; 1 of 20 games with an invalid move; 2 of 80 turns
    assert rates == pytest.approx({"optimal_draw_or_win": 0.9, "optimal_draw": 0.8, "random_win": 0.9,
                                   "random_loss": 0.1, "invalid_games": 0.05, "invalid_per_turn": 0.025})
    worse = {**rates, "optimal_draw_or_win": 0.5, "random_win": 0.5, "invalid_games": 0.3}
    met = targets({"rl": rates, "sft": worse, "teacher": worse})
    assert met == {"optimal_draw_or_win >= 0.90": True, "random_win >= 0.80": True, "invalid_games <= 0.02": False,
                   "above SFT start": True, "above the teacher": True}


@pytest.mark.timeout(600)
def test_population_step_benchmark_prints_a_table_then_its_json_last(capsys):
    import json

    from benchmarks.population_step import main

    summary = main(["--agents", "2", "--preset", "tiny", "--tokens", "4", "--rounds", "1", "--sequential"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == summary
    assert {"agents": 2, "preset": "tiny", "tokens": 4}.items() <= summary.items()
    assert summary["ratio"] == pytest.approx(summary["population_s"] / summary["single_s"], abs=1e-3)
    # Each agent gets the single agent's workload: 4 prompts x 8 completions of at most 4 tokens.
    assert 0 < summary["single_tokens"] <= 4 * 8 * 4 and 0 < summary["population_tokens"] <= 2 * 4 * 8 * 4
    assert any(line.startswith("| population | 2 |") for line in lines)
    assert any(line.startswith("| sequential | 2 |") for line in lines)


def test_tictactoe_probe_by_hand():
    import math
    from types import SimpleNamespace

    import torch
    from transformers import AutoTokenizer

    from benchmarks.tictactoe_probe import board_of, probe
    from llm_gym.tasks.tictactoe import SYSTEM_PROMPT, render_board
    from llm_gym.tiny import tiny_model_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path("tiny", env_ids=["llm_gym/TicTacToe-v0"]))
    five, vocab = tokenizer.convert_tokens_to_ids("5"), len(tokenizer)

    class AlwaysFive(torch.nn.Module):  # every position's top token is the digit 5, by 10 nats
        def forward(self, input_ids):
            logits = torch.zeros(1, input_ids.shape[1], vocab)
            logits[..., five] = 10.0
            return SimpleNamespace(logits=logits)

    user = lambda board: {"role": "user", "content": f"Move.\n\n{render_board(board)}\n\nFree cells: ... Your move."}  # noqa: E731
    game = [{"role": "system", "content": SYSTEM_PROMPT}, user("........."),
            {"role": "assistant", "content": "<think>Best play draws, and 5 keeps that.</think><move>5</move>"},
            user("O...X...."), {"role": "assistant", "content": "<think>I take 9.</think><move>9</move>"}]  # fmt: skip
    assert board_of(game[3]["content"]) == "O...X...."
    # turn 1 (X, empty board): 5 is free and a best move (every first move draws) and the cell the think named;
    # turn 2 (X, O on 1 and X on 5): 5 is taken, and the think named 9; at the think's digit the same
    result = probe(AlwaysFive(), tokenizer, [game])
    miss = math.log(math.exp(10) + vocab - 1)
    nll = ((miss - 10) + miss) / 2
    assert result == pytest.approx({"turns": 2, "move_nll": nll, "valid": 0.5, "best": 0.5, "copy": 0.5,
                                    "think_nll": nll, "think_valid": 0.5, "think_best": 0.5})  # fmt: skip
