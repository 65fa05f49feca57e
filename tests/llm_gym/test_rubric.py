"""Rubric: weighted parts by name, seed-style callables, failures and hangs score 0."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from llm_gym.rubric import Rubric


def one(completion: str, **_) -> float:
    return 1.0


def half(completion: str, **_) -> float:
    return 0.5


def length(completion: str, *, prefill: str = "", **_) -> float:
    return float(len(prefill + completion))


def broken(completion: str, **_) -> float:
    raise ZeroDivisionError("bug in reward")


def hangs(completion: str, **_) -> float:
    while True:
        time.sleep(1)


def spins(completion: str, **_) -> float:
    while True:
        pass


def nan(completion: str, **_) -> float:
    return float("nan")


def test_weighted_total_and_parts():
    rubric = Rubric([one, half, length], [0.5, 2.0, -0.25])
    score = rubric.score("abc", {"x": 1}, prefill="<p>")
    # 0.5*1 + 2*0.5 - 0.25*len("<p>abc")=6 -> 0.5 + 1.0 - 1.5 = 0.0
    assert score.parts == {"one": 1.0, "half": 0.5, "length": 6.0}
    assert score.total == pytest.approx(0.0, abs=1e-12)
    assert score.errors == {}
    assert rubric.max_total == 2.5


def test_problem_columns_reach_functions_as_keywords():
    seen = {}

    def spy(completion, *, prefill="", **cols):
        seen.update(cols, completion=completion, prefill=prefill)
        return 0.0

    Rubric([spy]).score("c", {"nums": [1, 2], "target": 3}, prefill="p")
    assert seen == {"nums": [1, 2], "target": 3, "completion": "c", "prefill": "p"}


def test_failure_scores_zero_is_counted_and_logged(caplog):
    rubric = Rubric([one, broken, nan], names=["ok", "bad", "nan"])
    with caplog.at_level(logging.WARNING, logger="llm_gym.rubric"):
        first = rubric.score("x", {})
        rubric.score("y", {})
    assert first.parts == {"ok": 1.0, "bad": 0.0, "nan": 0.0}
    assert first.total == 1.0
    assert first.errors == {"bad": "ZeroDivisionError: bug in reward", "nan": "ValueError: returned nan"}
    assert rubric.failures == {"bad": 2, "nan": 2}
    assert rubric.calls == 2
    assert "reward function 'bad' failed (ZeroDivisionError: bug in reward); scored 0 (2 failures so far)" in (
        caplog.text
    )


@pytest.mark.parametrize("fn", [hangs, spins])
def test_hanging_function_scores_zero_in_main_thread(fn):
    rubric = Rubric([one, fn], timeout=0.2)
    start = time.monotonic()
    score = rubric.score("x", {})
    assert time.monotonic() - start < 1.5
    assert score.parts == {"one": 1.0, fn.__name__: 0.0}
    assert score.errors == {fn.__name__: "timed out after 0.2s"}
    assert rubric.failures[fn.__name__] == 1


@pytest.mark.parametrize("fn", [hangs, spins])
def test_hanging_function_scores_zero_in_worker_thread(fn):
    rubric = Rubric([fn, half], timeout=0.2)
    start = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        score = pool.submit(rubric.score, "x", {}).result(timeout=10)
    assert time.monotonic() - start < 1.5
    assert score.total == 0.5
    assert score.errors == {fn.__name__: "timed out after 0.2s"}


def test_seed_style_callable_gets_completion_answer_question_with_arrays():
    calls = []

    def combined(completion, solution, prompt):
        calls.append((completion, solution, prompt))
        return float(prompt.flatten().sum() == solution)

    rubric = Rubric.from_callable(combined)
    assert rubric.names == ["combined"] and rubric.positional_parts == ("combined",)
    score = rubric.score("text", {"question": [1, 2, 4], "answer": 7, "nums": [1, 2, 4]}, prefill="<think>")
    assert score.total == 1.0
    completion, solution, prompt = calls[0]
    assert completion == "text" and solution == 7
    assert isinstance(prompt, np.ndarray) and prompt.tolist() == [1, 2, 4]


def test_seed_style_callable_is_accepted_inside_a_rubric_too():
    def legacy(completion, answer, question):
        return float(answer == 3)

    def keyword(completion, target, nums, prefill=""):  # three positionals but takes prefill: keyword style
        return float(target == 3)

    rubric = Rubric([legacy, keyword])
    assert rubric.positional_parts == ("legacy",)
    assert rubric.score("", {"answer": 3, "question": [1], "target": 3, "nums": [1]}).parts == {
        "legacy": 1.0, "keyword": 1.0
    }


def test_from_callable_returns_a_rubric_unchanged():
    rubric = Rubric([one])
    assert Rubric.from_callable(rubric) is rubric


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"funcs": []}, "a Rubric needs at least one reward function"),
        ({"funcs": [one, half], "weights": [1.0]},
         r"got 2 reward functions, 1 weights and 2 names: give one weight and one name per function"),
        ({"funcs": [one, one]}, r"reward function names must be unique, got \['one', 'one'\]: pass names=\[...\]"),
        ({"funcs": [one], "weights": [float("inf")]}, r"weights must be finite numbers, got \[inf\]"),
        ({"funcs": [one], "timeout": 0}, "timeout must be positive seconds or None, got 0"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        Rubric(**kwargs)
