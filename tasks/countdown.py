"""Countdown: combine the given numbers with + - * / to reach the target (``llm_gym/Countdown-v0``).

## Description
The TinyZero / AgileRL Countdown game. A problem is a list of 3-4 numbers (``nums``) and a
``target``; the model writes an equation that uses every number exactly once and equals the
target. Problems come from a generator (every one solvable by construction) or from the hub
dataset ``Jiayi-Pan/Countdown-Tasks-3to4`` (same schema: ``nums``, ``target``).

## Prompt
Seed 001's conversation template, verbatim: a system message, a user message with
``{question}`` (the numbers, rendered as ``[44, 19, 35]``) and ``{answer}`` (the target), and
the assistant prefill ``"Let me solve this step by step.\\n<think>"``.

## Answer format
The completion continues the prefill: ``<reasoning></think>\\n<answer><equation></answer>``,
e.g. ``" 44-19=25, 25+35=60 </think>\\n<answer>(44 - 19) + 35</answer>"``.

## Rewards (weights 1 and 1, total in [0, 2])
* ``format`` in {0, 1}: seed 001's regex ``^<think>...</think>\\n<answer>...</answer>$``
  (no ``<think>``/``</think>`` inside the reasoning; like the seed's ``$``, one trailing newline
  is tolerated) applied to the assistant turn from its opening ``<think>``: when the prefill
  contains ``<think>``, to ``"<think>"`` + the prefill text after its last ``<think>`` + the
  completion (exactly the seed's ``"<think>" + completion`` for the default prefill); when the
  prefill has no ``<think>`` (a custom template), the completion itself must start with it.
* ``equation`` in {0, 1}, the ``correct_part``: 1 iff that text holds exactly one
  ``<answer>...</answer>`` whose content is a safe expression (:mod:`llm_gym.arithmetic`:
  integer literals, binary ``+ - * /``, parentheses; no unary minus, ``**``, ``^``, decimals)
  using the multiset ``nums`` exactly (``81*1`` for ``[1, 81, 1, 1]`` scores 0), whose exact
  rational value equals the target. Non-integer intermediates are allowed, as in the seed's
  float ``eval``: ``(8 / 3) * 3`` reaches 8. Division by zero or any rejected text scores 0.

## Arguments
The fields of :class:`CountdownConfig` (generator difficulty), plus the env's ``dataset``,
``split``, ``size``, ``seed``, ``tokenizer``, ``template``, ``rubric``.

## Version History
* v0: initial version.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from llm_gym.arithmetic import UnsafeExpression, evaluate, literals
from llm_gym.registry import register_task
from llm_gym.rubric import Rubric
from llm_gym.task import Task
from llm_gym.template import ConversationTemplate

__all__ = [
    "CountdownConfig", "generate", "solve", "format_reward", "equation_reward", "extract_answer", "TASK",
    "PREFILL", "TEMPLATE",
]

PREFILL = "Let me solve this step by step.\n<think>"
_THINK = "<think>"
# Seed 001's format regex, unchanged (its `$` also matches before one final newline).
_FORMAT = re.compile(r"^<think>([^<]*(?:<(?!/?think>)[^<]*)*)<\/think>\n<answer>([\s\S]*?)<\/answer>$")
_MAX_SOLVER_NUMBERS = 5  # 5 numbers: ~10^5 expression trees; 6 would take seconds per problem
_MAX_DRAWS = 10_000


@dataclass(frozen=True)
class CountdownConfig:
    """Generator knobs (defaults match ``Jiayi-Pan/Countdown-Tasks-3to4``)."""

    min_numbers: int = 3
    """Fewest numbers in a problem."""
    max_numbers: int = 4
    """Most numbers in a problem (at most 5, so the oracle stays fast)."""
    min_number: int = 1
    """Smallest number drawn."""
    max_number: int = 99
    """Largest number drawn."""
    min_target: int = 1
    """Smallest target."""
    max_target: int = 100
    """Largest target."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_numbers <= self.max_numbers <= _MAX_SOLVER_NUMBERS:
            raise ValueError(
                f"need 1 <= min_numbers <= max_numbers <= {_MAX_SOLVER_NUMBERS}, got min_numbers="
                f"{self.min_numbers}, max_numbers={self.max_numbers}: adjust them"
            )
        if not 1 <= self.min_number <= self.max_number:
            raise ValueError(
                f"need 1 <= min_number <= max_number, got {self.min_number} and {self.max_number}"
            )
        if not 1 <= self.min_target <= self.max_target:
            raise ValueError(
                f"need 1 <= min_target <= max_target, got {self.min_target} and {self.max_target}"
            )


def _ints(values: Any) -> list[int]:
    """A numbers column (list, numpy array, tensor) as python ints."""
    return [int(v) for v in np.asarray(values).ravel().tolist()]


def _combine(rng: np.random.Generator, nums: list[int]) -> int:
    """Fold ``nums`` into one positive integer with random ops on random pairs."""
    pool = list(nums)
    while len(pool) > 1:
        i, j = (int(k) for k in rng.choice(len(pool), size=2, replace=False))
        a, b = pool[i], pool[j]
        results = [a + b, a * b]
        if a != b:
            results.append(abs(a - b))
        if a % b == 0:
            results.append(a // b)
        elif b % a == 0:
            results.append(b // a)
        for k in sorted((i, j), reverse=True):
            pool.pop(k)
        pool.append(results[int(rng.integers(len(results)))])
    return pool[0]


def generate(rng: np.random.Generator, config: CountdownConfig) -> dict[str, Any]:
    """Draw one solvable problem: random numbers folded by random ops into a target in range.

    Every intermediate result is a positive integer, so the construction is itself a solution.

    Args:
        rng: The source of randomness (the same state gives the same problem).
        config: Difficulty knobs.

    Returns:
        ``{"nums": [...], "target": int}``.

    Raises:
        RuntimeError: if no target in range is found (knobs that admit no problem).
    """
    for _ in range(_MAX_DRAWS // 10):
        n = int(rng.integers(config.min_numbers, config.max_numbers + 1))
        nums = [int(x) for x in rng.integers(config.min_number, config.max_number + 1, size=n)]
        for _ in range(10):
            target = _combine(rng, nums)
            if config.min_target <= target <= config.max_target:
                return {"nums": nums, "target": target}
    raise RuntimeError(f"no Countdown problem with a target in range after {_MAX_DRAWS} draws: {config}")


def _show(value: Fraction) -> str:
    return str(value)  # "25", "-3" or "8/3"


def _search(items: list[tuple[Fraction, str]], target: Fraction, natural: bool) -> list[str] | None:
    """Steps and final expression reaching ``target`` from ``items`` (value, text), or None."""
    if len(items) == 1:
        return [items[0][1]] if items[0][0] == target else None
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            (a, ea), (b, eb) = items[i], items[j]
            pa = ea if ea.isdigit() else f"({ea})"
            pb = eb if eb.isdigit() else f"({eb})"
            candidates = [
                (a + b, f"{_show(a)}+{_show(b)}", f"{pa} + {pb}"),
                (a * b, f"{_show(a)}*{_show(b)}", f"{pa} * {pb}"),
                (a - b, f"{_show(a)}-{_show(b)}", f"{pa} - {pb}"),
                (b - a, f"{_show(b)}-{_show(a)}", f"{pb} - {pa}"),
            ]
            if b != 0:
                candidates.append((a / b, f"{_show(a)}/{_show(b)}", f"{pa} / {pb}"))
            if a != 0:
                candidates.append((b / a, f"{_show(b)}/{_show(a)}", f"{pb} / {pa}"))
            rest = [item for k, item in enumerate(items) if k not in (i, j)]
            for value, step, expr in candidates:
                if natural and (value < 0 or value.denominator != 1):
                    continue
                found = _search([*rest, (value, expr)], target, natural)
                if found is not None:
                    return [f"{step}={_show(value)}", *found]
    return None


def solve(problem: Mapping[str, Any]) -> str | None:
    """The oracle: a short reasoning trace and an equation, continuing :data:`PREFILL`.

    Solutions with non-negative integer steps are preferred; fractions and negatives are tried
    only when no such solution exists.

    Args:
        problem: A problem with ``nums`` and ``target``.

    Returns:
        E.g. ``" 44-19=25, 25+35=60 </think>\\n<answer>(44 - 19) + 35</answer>"``, or ``None``
        if no equation reaches the target.

    Raises:
        ValueError: if the problem has more than 5 numbers (the search would take too long).
    """
    nums = _ints(problem["nums"])
    if not 1 <= len(nums) <= _MAX_SOLVER_NUMBERS:
        raise ValueError(f"the Countdown oracle takes 1 to {_MAX_SOLVER_NUMBERS} numbers, got {len(nums)}")
    target = Fraction(np.asarray(problem["target"]).item())
    items = [(Fraction(n), str(n)) for n in nums]
    found = _search(items, target, natural=True) or _search(items, target, natural=False)
    if found is None:
        return None
    *steps, equation = found
    trace = ", ".join(steps) if steps else f"{equation}={_show(target)}"
    return f" {trace} </think>\n<answer>{equation}</answer>"


def _from_think(completion: str, prefill: str) -> str:
    """The assistant turn from its opening ``<think>`` (see the card's ``format`` reward)."""
    if _THINK in prefill:
        return _THINK + prefill.rsplit(_THINK, 1)[1] + completion
    return completion


def extract_answer(completion: str, *, prefill: str = "") -> str | None:
    """The stripped content of the only ``<answer>...</answer>``, or ``None`` if there are 0 or 2+.

    Args:
        completion: Text generated after the prompt.
        prefill: The template's assistant prefill.

    Returns:
        The answer text, or ``None``.
    """
    # Same tags as re.findall(r"<answer>([\s\S]*?)</answer>") finds, but linear: that regex is
    # quadratic on text with many "<answer>" and no "</answer>".
    text = _from_think(completion, prefill)
    tags: list[str] = []
    pos = 0
    while len(tags) < 2:
        start = text.find("<answer>", pos)
        end = -1 if start < 0 else text.find("</answer>", start + len("<answer>"))
        if end < 0:
            break
        tags.append(text[start + len("<answer>") : end])
        pos = end + len("</answer>")
    return tags[0].strip() if len(tags) == 1 else None


def format_reward(completion: str, *, prefill: str = "", **_: Any) -> float:
    """1.0 iff the turn is ``<think>...</think>\\n<answer>...</answer>`` (seed 001's regex).

    >>> format_reward(" 1+2=3 </think>\\n<answer>1 + 2</answer>", prefill=PREFILL)
    1.0
    >>> format_reward(" 1+2=3 </think><answer>1 + 2</answer>", prefill=PREFILL)
    0.0
    """
    return 1.0 if _FORMAT.match(_from_think(completion, prefill)) else 0.0


def equation_reward(completion: str, *, nums: Sequence[int], target: int, prefill: str = "", **_: Any) -> float:
    """1.0 iff the one answer uses exactly ``nums`` (as a multiset) and equals ``target`` exactly.

    >>> equation_reward(" x </think>\\n<answer>(44 - 19) + 35</answer>", nums=[44, 19, 35], target=60)
    1.0
    >>> equation_reward(" x </think>\\n<answer>81 * 1</answer>", nums=[1, 81, 1, 1], target=81)
    0.0
    """
    answer = extract_answer(completion, prefill=prefill)
    if answer is None:
        return 0.0
    try:
        value, used = evaluate(answer), literals(answer)
    except UnsafeExpression:
        return 0.0
    if Counter(used) != Counter(_ints(nums)):
        return 0.0
    return 1.0 if value == Fraction(np.asarray(target).item()) else 0.0


TEMPLATE = ConversationTemplate(
    [
        {
            "role": "system",
            "content": "You are a helpful assistant. You first think about the reasoning process in your mind "
            "and then provide the user with the answer.",
        },
        {
            "role": "user",
            "content": "Using each number in this list only once {question}, create an equation that equals "
            "{answer}. You can use basic arithmetic operations (+, -, *, /) and each number can only be used "
            "once. Show your work in <think> </think> tags. And return the final equation and answer in "
            "<answer> </answer> tags, for example <answer>(1 + 2) / 3</answer>.",
        },
        {"role": "assistant", "content": PREFILL},
    ]
)

TASK = Task(
    name="Countdown",
    version=0,
    columns=("nums", "target"),
    question_column="nums",
    answer_column="target",
    template=TEMPLATE,
    rubric=Rubric([format_reward, equation_reward], [1.0, 1.0], names=["format", "equation"]),
    correct_part="equation",
    config=CountdownConfig(),
    generate=generate,
    solve=solve,
    hf_dataset="Jiayi-Pan/Countdown-Tasks-3to4",
    description="Reach the target with + - * / using each given number once.",
)

register_task(TASK)
