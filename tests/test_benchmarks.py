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

