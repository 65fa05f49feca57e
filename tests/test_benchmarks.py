"""Tests for the benchmark helpers that compute reported numbers (the timings themselves are not tested)."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.grpo_step import step_flops
from benchmarks.workload import Workload


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


def test_token_counter_sums_every_agents_generated_tokens():
    from benchmarks.evolution import TokenCounter

    counter = TokenCounter()
    counter.log({"agent0/completion/generated_tokens": 10.0, "agent1/completion/generated_tokens": 5.0,
                 "agent0/completion/length_mean": 3.0}, 1)  # fmt: skip
    counter.log({"agent0/completion/generated_tokens": 2.0}, 2)
    assert counter.tokens == 17.0


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
def test_evolution_benchmark_quick_mode_matches_generated_tokens(tmp_path):
    from benchmarks.evolution import main

    record = main(["--quick", "--no-cache", "--results-dir", str(tmp_path)])
    (seed,) = record["seeds"]
    evolution, single = seed["evolution"]["generated_tokens"], seed["single"]["generated_tokens"]
    # The single agent stops at the first step that reaches the population's tokens: within one step.
    assert evolution > 0 and evolution <= single <= evolution + 2 * 4 * 12
    assert "evolution minus single agent:" in (tmp_path / "evolution.md").read_text()


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
