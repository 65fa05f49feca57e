"""Subtraction: the first number minus the second (``llm_gym/Subtraction-v0``).

## Description
Seed 004's task. A problem is ``input``, two numbers separated by a space (``"512 87"``), and
``difference``, the FIRST number minus the SECOND (``425``). That is what seed 004's data holds
(``input = f"{n2} {n1}"``, ``difference = n2 - n1``) although its system prompt says "second
minus the first"; here the prompt states the rule that the data follows.

## Prompt
Seed 004's system prompt, corrected as above and using this library's answer format; the user
message is the ``input`` string; the assistant prefill is Countdown's
``"Let me solve this step by step.\\n<think>"``.

## Answer format
``" 512-87=425 </think>\\n<answer>425</answer>"`` (continuing the prefill).

## Rewards (weights 1 and 1, total in [0, 2])
* ``format`` in {0, 1}: Countdown's ``format_reward`` (``<think>...</think>\\n<answer>...</answer>``).
* ``answer`` in {0, 1}, the ``correct_part``: the only ``<answer>`` holds an integer
  (optional sign, digits, surrounding spaces) equal to ``difference``.

## Arguments
:class:`SubtractionConfig` fields, plus the env's ``dataset``, ``split``, ``size``, ``seed``,
``tokenizer``, ``template``, ``rubric``.

## Version History
* v0: initial version (its answer part was first called ``accuracy``, a second name for exact
  accuracy in the tables; the reward is unchanged).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_gym.registry import register_task
from llm_gym.rubric import Rubric
from llm_gym.task import Task
from llm_gym.tasks.countdown import PREFILL, extract_answer, format_reward
from llm_gym.template import ConversationTemplate

__all__ = ["SubtractionConfig", "generate", "solve", "accuracy_reward", "TASK"]

_INTEGER = re.compile(r"[+-]?\d{1,40}")

SYSTEM_PROMPT = " ".join(
    textwrap.dedent(
        """
        A conversation between User and Assistant. The user gives two numbers, and the Assistant returns
        the first number minus the second number only. The assistant first thinks about the reasoning
        process in the mind and then provides the user with the answer. The reasoning process and answer
        are enclosed within <think> </think> and <answer> </answer> tags, respectively, on two lines, i.e.,
        <think> reasoning process here </think> then a new line then <answer> answer here </answer>
        """
    ).split()
)


@dataclass(frozen=True)
class SubtractionConfig:
    """Generator knobs (defaults match seed 004's data)."""

    max_value: int = 999
    """Both numbers are drawn uniformly from 0..max_value."""

    def __post_init__(self) -> None:
        if self.max_value < 0:
            raise ValueError(f"max_value must be >= 0, got {self.max_value}: numbers are drawn from 0..max_value")


def generate(rng: np.random.Generator, config: SubtractionConfig) -> dict[str, Any]:
    """Draw one problem ``{"input": "a b", "difference": a - b}``."""
    a, b = (int(x) for x in rng.integers(0, config.max_value + 1, size=2))
    return {"input": f"{a} {b}", "difference": a - b}


def solve(problem: Mapping[str, Any]) -> str:
    """The oracle: ``" a-b=d </think>\\n<answer>d</answer>"`` for input ``"a b"``.

    Raises:
        ValueError: if ``input`` is not two integers separated by whitespace.
    """
    parts = str(problem["input"]).split()
    if len(parts) != 2 or not all(_INTEGER.fullmatch(p) for p in parts):
        raise ValueError(f"subtraction input must be two integers like '512 87', got {problem['input']!r}")
    a, b = int(parts[0]), int(parts[1])
    return f" {a}-{b}={a - b} </think>\n<answer>{a - b}</answer>"


def accuracy_reward(completion: str, *, difference: int, prefill: str = "", **_: Any) -> float:
    """1.0 iff the only answer is the integer ``difference``.

    >>> accuracy_reward(" 5-7=-2 </think>\\n<answer>-2</answer>", difference=-2, prefill=PREFILL)
    1.0
    """
    answer = extract_answer(completion, prefill=prefill)
    if answer is None or not _INTEGER.fullmatch(answer):
        return 0.0
    return 1.0 if int(answer) == int(np.asarray(difference).item()) else 0.0


TASK = Task(
    name="Subtraction",
    version=0,
    columns=("input", "difference"),
    question_column="input",
    answer_column="difference",
    template=ConversationTemplate(
        [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "{question}"},
            {"role": "assistant", "content": PREFILL},
        ]
    ),
    rubric=Rubric([format_reward, accuracy_reward], [1.0, 1.0], names=["format", "answer"]),
    correct_part="answer",
    config=SubtractionConfig(),
    generate=generate,
    solve=solve,
    description="Subtract the second number from the first.",
)

register_task(TASK)
