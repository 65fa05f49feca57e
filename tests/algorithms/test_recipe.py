"""TrainConfig: typed fields, per-task default knobs, and the checks load_config makes."""

from __future__ import annotations

import pytest

from llm_gym.algorithms.recipe import DEMO_TASK_KWARGS, TrainConfig, load_config
from llm_gym.usage import UsageError


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_steps": 2.5}, r"^TrainConfig.max_steps=2.5 must be a whole number such as 4$"),
        ({"population": "4"}, r"^TrainConfig.population='4' must be a whole number such as 4 \(unquoted in YAML\)$"),
        ({"population": True}, r"^TrainConfig.population=True must be a whole number such as 4$"),
        ({"lr": "abc"}, r"^TrainConfig.lr='abc' must be a number such as 0.001 \(unquoted in YAML\)$"),
        ({"threads": 1.5}, r"^TrainConfig.threads=1.5 must be a whole number such as 4 \(or null\)$"),
        ({"threads": -2}, r"^TrainConfig.threads=-2 must be >= 1 \(or null for torch's default\)$"),
        ({"task_kwargs": [1]}, r"^TrainConfig.task_kwargs=\[1\] must be a mapping such as \{key: value\} \(or null\)$"),
        ({"model": 3}, r"^TrainConfig.model=3 must be a string \(or null\)$"),
    ],
)
def test_fields_are_type_checked(values, message):
    with pytest.raises(UsageError, match=message):
        load_config(**values)


def test_numbers_of_the_right_kind_pass():
    config = TrainConfig(lr=1, beta=0, max_steps=3, threads=None)  # an int is a valid float
    assert (config.lr, config.max_steps, config.threads) == (1, 3, None)


def test_task_kwargs_default_to_the_tasks_own():
    assert TrainConfig().task_kwargs == DEMO_TASK_KWARGS["llm_gym/Countdown-v0"]
    assert TrainConfig(task="llm_gym/Subtraction-v0").task_kwargs == {}
    assert TrainConfig(task="llm_gym/Subtraction-v0", task_kwargs={"max_value": 5}).task_kwargs == {"max_value": 5}
    assert TrainConfig(task_kwargs={}).task_kwargs == {}  # explicitly none: the task's generator defaults
