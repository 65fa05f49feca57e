"""Subtraction: generator, oracle, rewards by hand, prompt, env on seed-004-style data."""

from __future__ import annotations

import time

import datasets
import gymnasium as gym
import numpy as np
import pytest

import llm_gym  # noqa: F401  (registers the environments)
from llm_gym.tasks.countdown import PREFILL
from llm_gym.tasks.subtraction import TASK, SubtractionConfig, accuracy_reward, generate, solve

T = " 512-87=425 </think>\n"


@pytest.mark.parametrize(
    ("completion", "difference", "fmt", "acc"),
    [
        (T + "<answer>425</answer>", 425, 1.0, 1.0),
        (T + "<answer> 425 \n</answer>", 425, 1.0, 1.0),
        (T + "<answer>+425</answer>", 425, 1.0, 1.0),
        (T + "<answer>-425</answer>", -425, 1.0, 1.0),
        (T + "<answer>-425</answer>", 425, 1.0, 0.0),  # sign matters
        (T + "<answer>424</answer>", 425, 1.0, 0.0),
        (T + "<answer>425.0</answer>", 425, 1.0, 0.0),  # integers only
        (T + "<answer>4 2 5</answer>", 425, 1.0, 0.0),
        (T + "<answer>512-87</answer>", 425, 1.0, 0.0),  # an expression is not an answer
        (T + "<answer>425</answer><answer>425</answer>", 425, 1.0, 0.0),  # two answers
        (T + "425", 425, 0.0, 0.0),  # no tags
        (" 512-87=425 </think><answer>425</answer>", 425, 0.0, 1.0),  # newline missing: format only
        (T + "<answer>" + "9" * 100_000 + "</answer>", 425, 1.0, 0.0),
    ],
)
def test_rewards_by_hand(completion: str, difference: int, fmt: float, acc: float) -> None:
    start = time.perf_counter()
    problem = TASK.to_problem({"input": "512 87", "difference": difference})
    score = TASK.rubric.score(completion, problem, PREFILL)
    assert score.parts == {"format": fmt, "answer": acc} and not score.errors
    assert time.perf_counter() - start < 1.0


def test_accuracy_accepts_numpy_difference() -> None:
    assert accuracy_reward(T + "<answer>-3</answer>", prefill=PREFILL, difference=np.int64(-3)) == 1.0


def test_solver_by_hand() -> None:
    assert solve({"input": "512 87", "difference": 425}) == " 512-87=425 </think>\n<answer>425</answer>"
    assert solve({"input": "87 512", "difference": -425}) == " 87-512=-425 </think>\n<answer>-425</answer>"
    with pytest.raises(ValueError, match="two integers like '512 87', got '512'"):
        solve({"input": "512", "difference": 0})


def test_generator_matches_its_input_and_oracle_scores_full() -> None:
    config = SubtractionConfig()
    signs = set()
    for seed in range(200):
        problem = generate(np.random.default_rng(seed), config)
        a, b = (int(x) for x in problem["input"].split(" "))
        assert 0 <= a <= 999 and 0 <= b <= 999 and problem["difference"] == a - b  # first minus second
        signs.add(np.sign(problem["difference"]))
        assert TASK.rubric.score(solve(problem), TASK.to_problem(problem), PREFILL).total == 2.0
    assert {-1, 1} <= signs
    assert generate(np.random.default_rng(3), config) == generate(np.random.default_rng(3), config)


def test_knob_and_validation() -> None:
    assert generate(np.random.default_rng(0), SubtractionConfig(max_value=0)) == {"input": "0 0", "difference": 0}
    with pytest.raises(ValueError, match="max_value must be >= 0, got -1"):
        SubtractionConfig(max_value=-1)


def test_golden_rendered_prompt() -> None:
    messages = TASK.template.render(TASK.to_problem({"input": "512 87", "difference": 425}))
    assert messages == [
        {
            "role": "system",
            "content": "A conversation between User and Assistant. The user gives two numbers, and the Assistant "
            "returns the first number minus the second number only. The assistant first thinks about the "
            "reasoning process in the mind and then provides the user with the answer. The reasoning process "
            "and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, on two "
            "lines, i.e., <think> reasoning process here </think> then a new line then <answer> answer here "
            "</answer>",
        },
        {"role": "user", "content": "512 87"},
        {"role": "assistant", "content": "Let me solve this step by step.\n<think>"},
    ]
    assert TASK.env_id == "llm_gym/Subtraction-v0" and TASK.correct_part == "answer"


def test_env_on_seed_004_style_data() -> None:
    rng = np.random.default_rng(42)  # seed 004's construction: input "n2 n1", difference n2 - n1
    numbers1, numbers2 = rng.integers(0, 1000, 8), rng.integers(0, 1000, 8)
    data = datasets.Dataset.from_dict(
        {"input": [f"{n2} {n1}" for n1, n2 in zip(numbers1, numbers2)], "difference": numbers2 - numbers1}
    )
    env = gym.make("llm_gym/Subtraction-v0", dataset=data)
    for i in range(8):
        env.reset(options={"index": i})
        _, reward, terminated, _, info = env.step(solve(env.unwrapped._problem))
        assert (reward, terminated, info["correct"]) == (2.0, True, True)


def test_generated_env_with_knob() -> None:
    env = gym.make("llm_gym/Subtraction-v0", size=10, max_value=9)
    obs, _ = env.reset(seed=0)
    a, b = (int(x) for x in obs["messages"][1]["content"].split())
    assert 0 <= a <= 9 and 0 <= b <= 9
    _, reward, _, _, info = env.step(f" x </think>\n<answer>{a - b}</answer>")
    assert reward == 2.0 and info["rewards"] == {"format": 1.0, "answer": 1.0}
