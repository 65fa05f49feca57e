"""ProblemSet: deterministic generated splits that never share a problem; dataset-backed sets."""

from __future__ import annotations

import datasets
import pytest

from llm_gym.env import build_problems
from llm_gym.problems import ProblemSet, problem_key, split_of
from llm_gym.usage import UsageError


def test_same_seed_same_problems_other_seed_others(double_task):
    a = list(build_problems(double_task, size=30, seed=1))
    assert a == list(build_problems(double_task, size=30, seed=1))
    assert a != list(build_problems(double_task, size=30, seed=2))
    # size only truncates: the first problems do not depend on it
    assert list(build_problems(double_task, size=10, seed=1)) == a[:10]
    assert len(a) == 30 and all(p["target"] == 2 * p["n"] for p in a)


def test_train_and_test_are_disjoint_by_content(double_task):
    train = {p["n"] for p in build_problems(double_task, split="train", size=400, seed=0)}
    test = {p["n"] for p in build_problems(double_task, split="test", size=200, seed=0)}
    assert not train & test
    assert len(test) > 50  # a real held-out set, not a handful
    for n in test:
        assert split_of(problem_key({"n": n, "target": 2 * n}, ("n", "target")), 0.2) == "test"


def test_split_of_is_stable_and_honours_the_fraction():
    keys = [problem_key({"n": i}, ("n",)) for i in range(5000)]
    share = sum(split_of(k, 0.2) == "test" for k in keys) / len(keys)
    assert 0.18 < share < 0.22
    assert split_of('{"n": 1}', 0.2) == split_of('{"n": 1}', 0.2)


def test_indexing(double_task):
    problems = build_problems(double_task, size=3)
    assert problems[-1] == problems[2]
    with pytest.raises(IndexError, match=r"^problem 3 out of range for a set of 3$"):
        problems[3]
    problems[0]["n"] = -1  # callers get copies
    assert problems[0]["n"] != -1


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"split": "valid"}, ValueError, r"^split must be one of \('train', 'validation', 'test'\), got 'valid'$"),
        ({"size": 0}, ValueError, r"^a problem set needs at least one problem; got size=0$"),
        ({"test_fraction": 1.0}, ValueError, r"^test_fraction must be in \(0, 1\), got 1.0$"),
    ],
)
def test_generated_validation(double_task, kwargs, error, message):
    with pytest.raises(error, match=message):
        build_problems(double_task, **kwargs)


def test_from_dataset_errors(double_task):
    with pytest.raises(UsageError, match=r"^the dataset given to llm_gym/Double-v0 has no rows: give at least one problem$"):
        ProblemSet.from_dataset(double_task, datasets.Dataset.from_dict({"n": [], "target": []}))
    with pytest.raises(ValueError, match=r"^dataset has no split 'test'; splits: \['train'\]$"):
        ProblemSet.from_dataset(
            double_task, datasets.DatasetDict({"train": datasets.Dataset.from_list([{"n": 1, "target": 2}])}),
            split="test",
        )


def test_from_dataset_size_and_list_rows(double_task):
    rows = [{"n": i, "target": 2 * i} for i in range(5)]
    assert [p["n"] for p in ProblemSet.from_dataset(double_task, rows, size=3)] == [0, 1, 2]
    assert len(ProblemSet.from_dataset(double_task, rows, size=99)) == 5


def test_three_splits_are_disjoint_and_the_test_split_is_unchanged():
    from llm_gym.reasoning_gym import ReasoningGym

    knobs = {"min_numbers": 3, "max_numbers": 3, "max_number": 9, "max_target": 30}
    sizes = {"train_size": 400, "test_size": 200, "seed": 0, **knobs}
    env = ReasoningGym.from_task("llm_gym/Countdown-v0", None, validation_size=200, **sizes)
    plain = ReasoningGym.from_task("llm_gym/Countdown-v0", None, **sizes)
    columns = env.task.columns

    def keys(gym, split):
        return {problem_key(row, columns) for row in gym._data[split]["rows"]}

    train, validation, test = keys(env, "train"), keys(env, "validation"), keys(env, "test")
    assert env.splits == ("train", "test", "validation") and plain.splits == ("train", "test")
    assert env.num_problems("validation") == 200
    assert not train & validation and not train & test and not validation & test
    assert all(split_of(k, 0.2, 0.1) == "validation" for k in validation)
    assert test == keys(plain, "test")  # adding a validation split leaves the report's problems alone
    assert keys(plain, "train") & validation  # ...and takes its problems out of the training share


def test_validation_split_errors():
    from llm_gym.env import build_problems
    from llm_gym.registry import get_task

    task = get_task("llm_gym/Countdown-v0")
    with pytest.raises(ValueError, match=r"^the validation split needs validation_fraction > 0 \(e.g. 0.1\)$"):
        build_problems(task, split="validation", size=4)
    with pytest.raises(ValueError, match=r"^validation_fraction=0.8 must be >= 0 and leave a training share"):
        build_problems(task, split="train", size=4, validation_fraction=0.8)
