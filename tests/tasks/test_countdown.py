"""Countdown: rewards derived by hand, seed-001 compatibility, generator, oracle, env wiring."""

from __future__ import annotations

import re
import time
from collections import Counter

import datasets
import gymnasium as gym
import numpy as np
import pytest

import llm_gym  # noqa: F401  (registers the environments)
from llm_gym.arithmetic import evaluate, literals
from llm_gym.env import build_problems
from llm_gym.tasks.countdown import (
    PREFILL,
    TASK,
    CountdownConfig,
    equation_reward,
    extract_answer,
    format_reward,
    generate,
    solve,
)
from tests.seed001 import seed_functions

# seed 001's reward functions (the tutorial's own code) are the compatibility reference
seed_format_reward_func = seed_functions()["format_reward_func"]
seed_equation_reward_func = seed_functions()["equation_reward_func"]


def seed_rewards(completion: str, nums: list[int], target: int) -> tuple[float, float]:
    return (
        seed_format_reward_func([completion], [target])[0],
        seed_equation_reward_func([completion], [target], [np.array(nums)])[0],
    )


def ours(completion: str, nums: list[int], target: int, prefill: str = PREFILL) -> tuple[float, float]:
    return (
        format_reward(completion, prefill=prefill, nums=nums, target=target),
        equation_reward(completion, prefill=prefill, nums=nums, target=target),
    )


T = " 44-19=25, 25+35=60 </think>\n"  # a well-formed reasoning part
N, G = [44, 19, 35], 60

# (completion, nums, target, expected format, expected equation, seed agrees on equation)
CASES = [
    pytest.param(T + "<answer>(44 - 19) + 35</answer>", N, G, 1.0, 1.0, True, id="correct"),
    pytest.param(T + "<answer>44 + 19 + 35</answer>", N, G, 1.0, 0.0, True, id="wrong-value-98"),
    pytest.param(" x </think><answer>(44 - 19) + 35</answer>", N, G, 0.0, 1.0, True, id="no-newline"),
    pytest.param(" x\n<answer>(44 - 19) + 35</answer>", N, G, 0.0, 1.0, True, id="no-close-think"),
    pytest.param(" a <think> b </think>\n<answer>(44 - 19) + 35</answer>", N, G, 0.0, 1.0, True, id="nested-think"),
    pytest.param(T + "(44 - 19) + 35", N, G, 0.0, 0.0, True, id="no-answer-tag"),
    pytest.param(T + "<answer>(44 - 19) + 35", N, G, 0.0, 0.0, True, id="unclosed-answer"),
    pytest.param(T + "<answer>(44 - 19) + 35</answer><answer>1</answer>", N, G, 1.0, 0.0, True, id="two-answers"),
    pytest.param(T + "<answer>(44 - 19) + 35</answer> ", N, G, 0.0, 1.0, True, id="trailing-space"),
    pytest.param(T + "<answer>(44 - 19) + 35</answer>\n", N, G, 1.0, 1.0, True, id="one-trailing-newline"),
    pytest.param(T + "<answer>(44 - 19) + 35</answer>\n\n", N, G, 0.0, 1.0, True, id="two-trailing-newlines"),
    pytest.param(T + "<answer>  (44-19)+35 \n</answer>", N, G, 1.0, 1.0, True, id="whitespace-inside"),
    pytest.param(T + "<answer>(44 - 19)\n+ 35</answer>", N, G, 1.0, 0.0, True, id="bare-newline-syntax"),
    pytest.param(T + "<answer></answer>", N, G, 1.0, 0.0, True, id="empty-answer"),
    pytest.param(T + "<answer>(44 - 19) + 35 = 60</answer>", N, G, 1.0, 0.0, True, id="equals-suffix"),
    pytest.param(T + "<answer>44 + 19</answer>", N, 63, 1.0, 0.0, True, id="number-missing"),
    pytest.param(T + "<answer>44 + 44 - 19 - 9</answer>", N, G, 1.0, 0.0, True, id="number-reused"),
    pytest.param(T + "<answer>81*1</answer>", [1, 81, 1, 1], 81, 1.0, 0.0, True, id="multiset-81x1"),
    pytest.param(T + "<answer>81*1*1*1</answer>", [1, 81, 1, 1], 81, 1.0, 1.0, True, id="multiset-ok"),
    pytest.param(T + "<answer>5 / (3 - 3)</answer>", [3, 3, 5], 5, 1.0, 0.0, True, id="division-by-zero"),
    pytest.param(T + "<answer>(8 / 3) * 3</answer>", [8, 3, 3], 8, 1.0, 1.0, True, id="fraction-intermediate"),
    pytest.param(T + "<answer>3^2*1</answer>", [3, 2, 1], 9, 1.0, 0.0, True, id="caret"),
    # Where the seed is fooled (it evals what its character regex lets through), we are not:
    pytest.param(T + "<answer>3**2*1</answer>", [3, 2, 1], 9, 1.0, 0.0, False, id="power"),
    pytest.param(T + "<answer>-19 + 44 + 35</answer>", N, G, 1.0, 0.0, False, id="unary-minus"),
    pytest.param(T + "<answer>1.5 * 2</answer>", [1, 5, 2], 3, 1.0, 0.0, False, id="decimal"),
]


@pytest.mark.parametrize(("completion", "nums", "target", "fmt", "eq", "seed_agrees"), CASES)
def test_rewards_by_hand(completion: str, nums: list[int], target: int, fmt: float, eq: float, seed_agrees: bool):
    start = time.perf_counter()
    assert ours(completion, nums, target) == (fmt, eq)
    assert time.perf_counter() - start < 1.0
    seed_fmt, seed_eq = seed_rewards(completion, nums, target)
    assert seed_fmt == fmt  # the format part is exactly the seed's
    assert (seed_eq == eq) is seed_agrees


def test_prefill_without_think_requires_completion_to_open_it() -> None:
    answer = " x </think>\n<answer>(44 - 19) + 35</answer>"
    assert format_reward("<think>" + answer, prefill="") == 1.0
    assert format_reward(answer, prefill="") == 0.0
    assert format_reward("\n<think>" + answer, prefill="") == 0.0  # must start right at <think>
    assert equation_reward("<think>" + answer, prefill="", nums=N, target=G) == 1.0
    # Text after the prefill's <think> counts as reasoning: here it closes the tag itself.
    assert format_reward("\n<answer>1</answer>", prefill="Go.\n<think> done </think>") == 1.0
    assert format_reward(" done </think>\n<answer>1</answer>", prefill="Go.\n<think> more") == 1.0


def test_array_columns_and_float_target() -> None:
    completion = T + "<answer>(44 - 19) + 35</answer>"
    assert equation_reward(completion, prefill=PREFILL, nums=np.array([44, 19, 35]), target=np.int64(60)) == 1.0
    assert equation_reward(completion, prefill=PREFILL, nums=[[44, 19, 35]], target=60.0) == 1.0
    assert equation_reward(completion, prefill=PREFILL, nums=N, target=60.5) == 0.0


def test_extract_answer() -> None:
    assert extract_answer(" a </think>\n<answer> 1 + 2 </answer>", prefill=PREFILL) == "1 + 2"
    assert extract_answer("<answer>1</answer><answer>2</answer>") is None
    assert extract_answer("no tags") is None


_HUGE = [
    "<answer>" * 100_000,
    "</answer>" * 100_000,
    T + "<answer>" + "(" * 10_000 + "1" + ")" * 10_000 + "</answer>",
    T + "<answer>" + "9" * 100_000 + "</answer>",
    T + "<answer>35**44**19</answer>",
    T + "<answer>9^9^9</answer>",
    T + "<answer>__import__('os').system('true')</answer>",
    "<" * 1_000_000,
    " x" * 500_000 + " </think>\n<answer>1</answer>",
    " <thin" * 200_000 + "</think>\n<answer>1</answer>",
]


@pytest.mark.parametrize("completion", _HUGE, ids=lambda c: c[:20].replace("\n", "|"))
def test_adversarial_completions_score_fast(completion: str) -> None:
    start = time.perf_counter()
    format_reward(completion, prefill=PREFILL)
    assert equation_reward(completion, prefill=PREFILL, nums=N, target=G) == 0.0
    assert time.perf_counter() - start < 1.0


# --- oracle -------------------------------------------------------------------------------------
def test_solver_by_hand() -> None:
    # First pair (44, 19): 44+19=63 and 44*19=836 reach 60 with 35 in no way; 44-19=25, then 35+25=60.
    assert solve({"nums": [44, 19, 35], "target": 60}) == " 44-19=25, 35+25=60 </think>\n<answer>35 + (44 - 19)</answer>"
    assert solve({"nums": [7], "target": 7}) == " 7=7 </think>\n<answer>7</answer>"
    assert solve({"nums": [1, 1, 1], "target": 100}) is None  # at most (1+1)+1 = 3
    assert solve({"nums": [7], "target": 8}) is None


@pytest.mark.parametrize(("nums", "target"), [([1, 5, 5, 5], 24), ([3, 3, 8, 8], 24)])
def test_solver_uses_fractions_when_needed(nums: list[int], target: int) -> None:
    # 5 * (5 - 1/5) = 24 and 8 / (3 - 8/3) = 24 need a fractional step.
    completion = solve({"nums": nums, "target": target})
    assert completion is not None
    answer = extract_answer(completion, prefill=PREFILL)
    assert evaluate(answer) == target and Counter(literals(answer)) == Counter(nums)
    assert TASK.rubric.score(completion, TASK.to_problem({"nums": nums, "target": target}), PREFILL).total == 2.0


def test_solver_rejects_too_many_numbers() -> None:
    with pytest.raises(ValueError, match="1 to 5 numbers, got 6"):
        solve({"nums": [1, 2, 3, 4, 5, 6], "target": 21})


# --- generator ----------------------------------------------------------------------------------
def test_generated_problems_are_solvable_in_range_and_score_full() -> None:
    config = CountdownConfig()
    for seed in range(300):
        problem = generate(np.random.default_rng(seed), config)
        nums, target = problem["nums"], problem["target"]
        assert 3 <= len(nums) <= 4 and all(1 <= n <= 99 for n in nums) and 1 <= target <= 100
        assert all(type(n) is int for n in nums) and type(target) is int
        completion = solve(problem)
        assert completion is not None, problem
        assert TASK.rubric.score(completion, TASK.to_problem(problem), PREFILL).total == 2.0, completion
        assert seed_rewards(completion, nums, target) == (1.0, 1.0), completion


def test_generator_is_deterministic_and_varied() -> None:
    config = CountdownConfig()
    first = [generate(np.random.default_rng(s), config) for s in range(20)]
    again = [generate(np.random.default_rng(s), config) for s in range(20)]
    assert first == again
    assert len({(tuple(p["nums"]), p["target"]) for p in first}) == 20


def test_generator_respects_knobs() -> None:
    config = CountdownConfig(min_numbers=2, max_numbers=2, min_number=5, max_number=10, min_target=12, max_target=20)
    rng = np.random.default_rng(0)
    for _ in range(100):
        problem = generate(rng, config)
        assert len(problem["nums"]) == 2 and all(5 <= n <= 10 for n in problem["nums"])
        assert 12 <= problem["target"] <= 20 and solve(problem) is not None


def test_impossible_knobs_fail_clearly() -> None:
    config = CountdownConfig(min_numbers=1, max_numbers=1, max_number=1, min_target=50, max_target=60)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="no Countdown problem"):
        generate(np.random.default_rng(0), config)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"min_numbers": 4, "max_numbers": 3}, "min_numbers <= max_numbers"),
        ({"max_numbers": 6}, "<= 5"),
        ({"min_number": 0}, "1 <= min_number"),
        ({"min_target": 101}, "min_target <= max_target"),
    ],
)
def test_config_validation(knobs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        CountdownConfig(**knobs)


# --- template and env ---------------------------------------------------------------------------
def test_golden_rendered_prompt() -> None:
    messages = TASK.template.render(TASK.to_problem({"nums": [44, 19, 35], "target": 60}))
    assert messages == [
        {
            "role": "system",
            "content": "You are a helpful assistant. You first think about the reasoning process in your mind and "
            "then provide the user with the answer.",
        },
        {
            "role": "user",
            "content": "Using each number in this list only once [44, 19, 35], create an equation that equals 60. "
            "You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. Show "
            "your work in <think> </think> tags. And return the final equation and answer in <answer> </answer> "
            "tags, for example <answer>(1 + 2) / 3</answer>.",
        },
        {"role": "assistant", "content": "Let me solve this step by step.\n<think>"},
    ]


def test_task_declaration() -> None:
    assert TASK.env_id == "llm_gym/Countdown-v0"
    assert TASK.columns == ("nums", "target") and TASK.correct_part == "equation"
    assert TASK.rubric.names == ["format", "equation"] and TASK.rubric.weights == [1.0, 1.0]
    assert TASK.hf_dataset == "Jiayi-Pan/Countdown-Tasks-3to4"


def test_generated_env_scores_oracle() -> None:
    env = gym.make("llm_gym/Countdown-v0", size=20, max_number=20)
    for seed in range(5):
        env.reset(seed=seed)
        problem = env.unwrapped._problem
        assert max(problem["nums"]) <= 20
        _, reward, terminated, truncated, info = env.step(solve(problem))
        assert (reward, terminated, truncated, info["correct"]) == (2.0, True, False, True)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(" no idea </think>\n<answer>1 + 1</answer>")
    assert reward == 1.0 and info["rewards"] == {"format": 1.0, "equation": 0.0}


ROWS = [{"nums": [44, 19, 35], "target": 60}, {"nums": [1, 81, 1, 1], "target": 81}, {"nums": [8, 3, 3], "target": 8}]
ROWS += [generate(np.random.default_rng(100 + i), CountdownConfig()) for i in range(17)]


def _check_dataset_env(dataset: object, *, expect_all: bool) -> None:
    """Every problem the env shows is a row of ROWS, rendered and scored right."""
    env = gym.make("llm_gym/Countdown-v0", dataset=dataset)
    rows = {(tuple(r["nums"]), r["target"]): r for r in ROWS}
    seen = set()
    for i in range(len(env.unwrapped.problems)):
        obs, _ = env.reset(options={"index": i})
        problem = env.unwrapped._problem
        key = (tuple(int(n) for n in problem["nums"]), int(problem["target"]))
        seen.add(key)
        assert f"once {list(key[0])}, create an equation that equals {key[1]}." in obs["messages"][1]["content"]
        _, reward, _, _, _ = env.step(solve(problem))
        assert reward == 2.0
    assert seen <= set(rows) and len(seen) >= len(rows) // 2
    if expect_all:
        assert seen == set(rows)


def test_env_from_in_memory_dataset() -> None:
    _check_dataset_env(datasets.Dataset.from_list(ROWS), expect_all=False)
    _check_dataset_env(datasets.Dataset.from_list(ROWS).with_format("numpy"), expect_all=False)


def test_env_from_saved_dataset_path(tmp_path) -> None:
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    _check_dataset_env(str(tmp_path / "dict"), expect_all=True)
    # A single saved Dataset has no test split: train may lose the rows held out for testing.
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "disk"))
    _check_dataset_env(str(tmp_path / "disk"), expect_all=False)


def test_env_from_parquet_folder(tmp_path) -> None:
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    _check_dataset_env(str(tmp_path / "pq"), expect_all=False)


@pytest.mark.parametrize("kind", ["disk", "parquet"])
def test_loaded_train_and_test_splits_are_disjoint(tmp_path, kind: str) -> None:
    rows = [{"nums": [i, i + 1, i + 2], "target": 3 * i + 3} for i in range(1, 60)]
    if kind == "disk":
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "d"))
    else:
        (tmp_path / "d").mkdir()
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d" / "train.parquet"))
    train = {tuple(p["nums"]) for p in build_problems(TASK, dataset=str(tmp_path / "d"), split="train")}
    test = {tuple(p["nums"]) for p in build_problems(TASK, dataset=str(tmp_path / "d"), split="test")}
    assert test and train and not train & test
    assert len(train) + len(test) == len(rows)
