"""The weak Countdown teacher: each habit on hand-built solutions, habit rates, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest

from llm_gym.tasks.countdown import CountdownConfig, equation_reward, generate, solve
from llm_gym.tasks.countdown_teacher import WeakTeacher, apply_habit

KNOBS = CountdownConfig(min_numbers=3, max_numbers=3, max_number=9, max_target=30)


def problems(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [generate(rng, KNOBS) for _ in range(n)]


def test_habits_on_hand_built_answers():
    assert apply_habit("last_step", "4-1=3, 3*5=15", "(4 - 1) * 5") == "3 * 5"
    assert apply_habit("last_step", "2+3=5", "2 + 3") is None  # one step: the last step is the answer
    assert apply_habit("swap", "4-1=3, 5-3=2", "5 - (4 - 1)") == "(4 - 1) - 5"
    assert apply_habit("swap", "8/2=4, 4/4=1", "(8 / 2) / 4") == "4 / (8 / 2)"
    assert apply_habit("swap", "4-1=3, 3*5=15", "(4 - 1) * 5") is None  # top level is *
    assert apply_habit("swap", "4-2=2, 2-2=0", "(4 - 2) - 2") == "2 - (4 - 2)"
    assert apply_habit("swap", "3-3=0", "3 - 3") is None  # equal operands: swapping changes nothing
    assert apply_habit("no_parens", "4-1=3, 3*5=15", "(4 - 1) * 5") == "4 - 1 * 5"
    assert apply_habit("no_parens", "2+3=5", "2 + 3") is None
    with pytest.raises(ValueError, match="unknown teacher habit 'typo'"):
        apply_habit("typo", "", "")


def test_habit_answers_score_as_a_verifier_says():
    problem = {"nums": [4, 1, 5], "target": 15}
    assert solve(problem) == " 4-1=3, 5*3=15 </think>\n<answer>5 * (4 - 1)</answer>"
    wrong = WeakTeacher({"last_step": 1.0})(problem)
    assert wrong == " 4-1=3, 5*3=15 </think>\n<answer>5 * 3</answer>"
    assert equation_reward(wrong, **problem) == 0.0  # 3 is not one of the numbers
    assert equation_reward(WeakTeacher({})(problem), **problem) == 1.0  # no habit: the oracle


def test_habit_rate_matches_its_probability():
    batch = problems(2000)
    teacher = WeakTeacher({"last_step": 0.6}, seed=3)
    scores = [equation_reward(teacher(p), **p) for p in batch]
    rate = teacher.applied["last_step"] / teacher.calls
    assert teacher.calls == 2000
    # binomial(2000, 0.6): one standard error is 1.1 points; 4 of them is 4.4
    assert abs(rate - 0.6) < 0.044
    assert sum(scores) / len(scores) == pytest.approx(1 - rate)  # every 3-number trace has 2 steps
    always, never = WeakTeacher({"last_step": 1.0}), WeakTeacher({"last_step": 0.0})
    assert all(equation_reward(always(p), **p) == 0.0 for p in batch[:200])
    assert [never(p) for p in batch[:200]] == [solve(p) for p in batch[:200]]


def test_same_seed_same_data_and_describe():
    batch = problems(50)
    a, b = WeakTeacher({"swap": 0.5, "last_step": 0.5}, seed=7), WeakTeacher({"last_step": 0.5, "swap": 0.5}, seed=7)
    assert [a(p) for p in batch] == [b(p) for p in batch]
    assert a.describe() == "weak Countdown teacher: oracle trace, answer habits last_step p=0.5, swap p=0.5"
    assert WeakTeacher({}).describe() == "weak Countdown teacher: oracle trace, answer habits no habit (the oracle)"


def test_bad_teachers_are_rejected():
    with pytest.raises(ValueError, match="unknown teacher habit 'lastep'"):
        WeakTeacher({"lastep": 0.5})
    with pytest.raises(ValueError, match="'swap' has probability 1.5"):
        WeakTeacher({"swap": 1.5})
