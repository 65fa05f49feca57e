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
