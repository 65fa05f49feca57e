"""An imperfect Countdown teacher: the oracle with a weaker model's systematic habits.

Distilled SFT data from a weaker model is the realistic warm-up the GRPO main job starts from
(issue 12): the student copies the teacher's habits, and the verifier -- not more teacher data --
is what can train them away. :class:`WeakTeacher` writes the oracle's reasoning trace, then, with
a set probability per habit, the answer a weaker model would write:

* ``last_step``: the answer is only the trace's last step, on the intermediate result
  (``" 4-1=3, 3*5=15 </think>\\n<answer>3 * 5</answer>"`` instead of ``(4 - 1) * 5``). It uses
  a number that is not in the list, so it always scores 0. Applies to traces of 2+ steps.
* ``swap``: the two operands of the equation's top-level ``-`` or ``/`` change places
  (``5 - (4 - 1)`` -> ``(4 - 1) - 5``). Applies when the top-level operator is ``-`` or ``/``
  and the operands differ in value.
* ``no_parens``: every parenthesis is dropped (``(4 - 1) * 5`` -> ``4 - 1 * 5``); wrong only
  where precedence needed them.

The reasoning trace is always the oracle's: the habits sit in the answer, the part the reward
checks. Habits are drawn independently per example from the teacher's own seeded generator, so
the same teacher on the same problems writes the same data.

    teacher = WeakTeacher({"last_step": 0.6}, seed=1)
    examples = oracle_examples(task, tokenizer, size=4000, solver=teacher, **knobs)
    teacher.applied   # {"last_step": 2391}: how often each habit was written
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from llm_gym.tasks.countdown import solve

__all__ = ["HABITS", "WeakTeacher", "apply_habit"]

HABITS = ("last_step", "swap", "no_parens")
"""The habits a :class:`WeakTeacher` can have, in the order they are applied."""

_COMPLETION = re.compile(r"^ (?P<trace>.*) </think>\n<answer>(?P<answer>.*)</answer>$", re.S)
_STEP = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


def _top_level(expression: str) -> int | None:
    """Index of the one binary operator outside every parenthesis, or None if not exactly one."""
    depth, found = 0, []
    for i, ch in enumerate(expression):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and ch in "+-*/":
            found.append(i)
    return found[0] if len(found) == 1 else None


def _strip_outer(text: str) -> str:
    """``(a - b)`` -> ``a - b`` when the parentheses enclose the whole text."""
    text = text.strip()
    if text.startswith("(") and text.endswith(")") and _top_level(text[1:-1]) is not None:
        return text[1:-1]
    return text


def apply_habit(habit: str, trace: str, answer: str) -> str | None:
    """The answer ``habit`` makes of the oracle's ``answer``, or None where the habit does not apply.

    Args:
        habit: One of :data:`HABITS`.
        trace: The oracle's reasoning steps, e.g. ``"4-1=3, 3*5=15"``.
        answer: The oracle's equation, e.g. ``"(4 - 1) * 5"``.

    Returns:
        The habit's answer, e.g. ``"3 * 5"`` for ``last_step``.

    Raises:
        ValueError: for an unknown habit.

    >>> apply_habit("last_step", "4-1=3, 3*5=15", "(4 - 1) * 5")
    '3 * 5'
    >>> apply_habit("swap", "4-1=3, 5-3=2", "5 - (4 - 1)")
    '(4 - 1) - 5'
    >>> apply_habit("no_parens", "4-1=3, 3*5=15", "(4 - 1) * 5")
    '4 - 1 * 5'
    """
    if habit == "last_step":
        steps = trace.split(", ")
        step = _STEP.match(steps[-1]) if len(steps) > 1 else None
        return f"{step.group(1)} {step.group(2)} {step.group(3)}" if step else None
    if habit == "swap":
        i = _top_level(answer)
        if i is None or answer[i] not in "-/":
            return None
        left, right = answer[:i].strip(), answer[i + 1 :].strip()
        if _strip_outer(left) == _strip_outer(right):
            return None
        return f"{right} {answer[i]} {left}"
    if habit == "no_parens":
        flat = answer.replace("(", "").replace(")", "")
        return flat if flat != answer else None
    raise ValueError(f"unknown teacher habit {habit!r}; choose from {', '.join(HABITS)}")


class WeakTeacher:
    """The Countdown oracle with systematic answer habits (a callable like ``task.solve``).

    Args:
        habits: Probability per habit (keys of :data:`HABITS`), each in [0, 1], e.g.
            ``{"last_step": 0.6}``. Where several fire on one example they compose in
            :data:`HABITS` order.
        seed: Seed of the teacher's habit draws.

    Raises:
        ValueError: for an unknown habit or a probability outside [0, 1].
    """

    def __init__(self, habits: Mapping[str, float], seed: int = 0) -> None:
        unknown = sorted(set(habits) - set(HABITS))
        if unknown:
            raise ValueError(f"unknown teacher habit {unknown[0]!r}; choose from {', '.join(HABITS)}")
        for name, p in habits.items():
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"teacher habit {name!r} has probability {p}; it must be in [0, 1]")
        self.habits = {name: float(habits[name]) for name in HABITS if name in habits}
        self.rng = np.random.default_rng(seed)
        self.calls = 0
        """Solutions written."""
        self.applied = dict.fromkeys(self.habits, 0)
        """How many solutions each habit changed."""

    def __call__(self, problem: Mapping[str, Any]) -> str | None:
        """The teacher's completion for ``problem`` (the oracle's format), or None if unsolvable."""
        oracle = solve(problem)
        if oracle is None:
            return None
        self.calls += 1
        parts = _COMPLETION.match(oracle)
        if parts is None:  # pragma: no cover - the oracle always writes this format
            return oracle
        trace, answer = parts.group("trace"), parts.group("answer")
        for name, p in self.habits.items():
            draw = self.rng.random()  # one draw per habit per example, applied or not
            if draw < p:
                changed = apply_habit(name, trace, answer)
                if changed is not None:
                    answer = changed
                    self.applied[name] += 1
        return f" {trace} </think>\n<answer>{answer}</answer>"

    def describe(self) -> str:
        """One line for logs and the demo output: what this teacher does."""
        rates = ", ".join(f"{name} p={p:g}" for name, p in self.habits.items()) or "no habit (the oracle)"
        return f"weak Countdown teacher: oracle trace, answer habits {rates}"
