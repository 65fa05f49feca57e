"""Zebra: logic grid puzzles with one solution (``llm_gym/Zebra-v0``).

## Description
``houses`` houses stand in a row, numbered 1 to N from left to right. Each house has one value of
each of ``attributes`` attributes (name, color, pet, drink, hobby, food), every value in exactly
one house. Numbered clues ("Bob lives directly left of the cat owner.") pin down the assignment.
Puzzles are generated: a random solution, true clues drawn from the ``clue_mix`` until the
solver finds exactly one solution, then (``reduce``) every clue whose removal keeps the solution
unique is dropped, in random order. So every puzzle has a unique solution and no clue can be
left out.

The solver is this module's own: bitmask domains (one mask of possible houses per value),
propagation of every clue and of the all-different rule to a fixpoint, then backtracking on the
smallest domain, counting at most 2 solutions. It was chosen over OR-Tools CP-SAT (the RL report
in seed 002 used CP-SAT): at these sizes (at most 6 x 6) it decides uniqueness in 0.3 ms (4 x 3)
to 2.2 ms (6 x 6) per call on one CPU core, it needs no install (ortools 9.15 is a 30 MB wheel that
pulls pandas and absl-py and pins protobuf to 6.33), and its propagation steps double as the
oracle's reasoning trace. Generation (a few dozen solver calls per puzzle) makes ~100 puzzles/s
at the default 4 x 3, ~10/s at 6 x 6.

## Prompt
A system message (Countdown's), the ``puzzle`` (rules, attributes and their values in order,
numbered clues) with the answer format, and the assistant prefill
``"Let me solve this step by step.\\n<think>"``.

## Answer format
``<answer>`` holds one line per house, ``House <n>: <value>, <value>, ...``: one value of every
attribute (any order; each value names its attribute), e.g.::

    <answer>
    House 1: Alice, red, cat
    House 2: Bob, green, dog
    </answer>

## Rewards (weights 1, 1, 1, total in [0, 3])
* ``format`` in {0, 1}: Countdown's ``format_reward`` (``<think>...</think>\\n<answer>...</answer>``).
* ``exact`` in {0, 1}, the ``correct_part``: every cell is right.
* ``partial`` in [0, 1]: the share of the N x M cells that are right; one swapped pair of values
  scores ``1 - 2/(N*M)`` and is not exact.
A malformed answer scores 0 on ``exact`` and ``partial``, after a single linear scan: not
exactly one ``<answer>``, more than 4,000 characters, not N lines ``House <n>: ...`` with the
houses 1..N once each, a line without exactly one known value of every attribute, or a value in
two houses.

## Oracle
The deductions of the solver, one per cell in the order it fixed them ("red: house 2 (clue 1)",
"tea: house 4 (elimination)", "cat: house 1 (the other houses contradict the clues)"), then the
solution in the answer format.

## Arguments
The fields of :class:`ZebraConfig` (size and clue mix), plus the env's ``dataset``, ``split``,
``size``, ``seed``, ``tokenizer``, ``template``, ``rubric``. Data in the schema (``puzzle``,
``solution``: the answer lines) works too.

## Version History
* v0: initial version.
"""

from __future__ import annotations

import bisect
import itertools
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm_gym.registry import register_task
from llm_gym.rubric import Rubric
from llm_gym.task import Task
from llm_gym.tasks.countdown import PREFILL, extract_answer, format_reward
from llm_gym.tasks.countdown import TEMPLATE as COUNTDOWN_TEMPLATE
from llm_gym.template import ConversationTemplate

__all__ = [
    "ZebraConfig", "CLUE_KINDS", "generate", "count_solutions", "solve", "exact_reward", "partial_reward",
    "parse_grid", "TASK",
]

# Attribute, phrase for "the person with value v", values (distinct across attributes, lower-case
# except names, so that each value names its attribute).
_ATTRIBUTES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("name", "{}", ("Alice", "Bob", "Carol", "David", "Eric", "Fiona")),
    ("color", "the person in the {} house", ("red", "green", "blue", "yellow", "white", "purple")),
    ("pet", "the {} owner", ("cat", "dog", "bird", "fish", "horse", "rabbit")),
    ("drink", "the {} drinker", ("tea", "coffee", "milk", "juice", "water", "soda")),
    ("hobby", "the person who likes {}", ("chess", "painting", "gardening", "hiking", "reading", "cooking")),
    ("food", "the person who eats {}", ("pizza", "sushi", "pasta", "tacos", "curry", "salad")),
)
_MAX_SIZE = 6
CLUE_KINDS = ("at", "not_at", "same", "not_same", "left_of", "next_to", "before")
"""Clue kinds: X in house h; X not in house h; X is Y; X is not Y; X directly left of Y;
X next to Y; X somewhere left of Y."""
_TEXT = {
    "at": "{x} lives in house {h}.",
    "not_at": "{x} does not live in house {h}.",
    "same": "{x} is {y}.",
    "not_same": "{x} is not {y}.",
    "left_of": "{x} lives directly left of {y}.",
    "next_to": "{x} and {y} live next to each other.",
    "before": "{x} lives somewhere left of {y}.",
}
_MAX_ANSWER_CHARS = 4_000
_MAX_BATCHES = 200
_LINE = re.compile(r"house\s+(\d{1,2})\s*:(.*)", re.IGNORECASE)


def _default_mix() -> dict[str, float]:
    return {"at": 1.0, "not_at": 1.0, "same": 3.0, "not_same": 1.0, "left_of": 1.0, "next_to": 1.0, "before": 1.0}


@dataclass(frozen=True)
class ZebraConfig:
    """Generator knobs."""

    houses: int = 4
    """Houses in the row (2 to 6)."""
    attributes: int = 3
    """Attributes per house (2 to 6), taken in the order name, color, pet, drink, hobby, food."""
    clue_mix: Mapping[str, float] = field(default_factory=_default_mix)
    """Relative weight of each clue kind of :data:`CLUE_KINDS` when clues are drawn (missing kinds: 0)."""
    reduce: bool = True
    """Drop every clue whose removal keeps the solution unique (else keep all drawn clues)."""

    def __post_init__(self) -> None:
        for name in ("houses", "attributes"):
            if not 2 <= getattr(self, name) <= _MAX_SIZE:
                raise ValueError(f"ZebraConfig.{name}={getattr(self, name)} must be between 2 and {_MAX_SIZE}")
        unknown = sorted(set(self.clue_mix) - set(CLUE_KINDS))
        if unknown:
            raise ValueError(f"ZebraConfig.clue_mix has unknown kind {unknown[0]!r}; kinds: {', '.join(CLUE_KINDS)}")
        weights = list(self.clue_mix.values())
        if any(not w >= 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"ZebraConfig.clue_mix weights must be >= 0 with one > 0, got {dict(self.clue_mix)}")


# ------------------------------------------------------------------------------------------ solver
# A puzzle state is a list of bitmasks, one per value: entity e = a * n + v (attribute a, value v)
# may be in house h iff bit h of masks[e] is set. A clue is (kind, e, e2) or (kind, e, house).


def _narrow(masks: list[int], e: int, new: int, reason: str, trace: list | None) -> bool:
    """Set ``masks[e]`` to ``new`` (a subset); record a newly fixed cell. False if it empties."""
    masks[e] = new
    if trace is not None and new & (new - 1) == 0 and new:
        trace.append((e, new.bit_length() - 1, reason))
    return new != 0


def _apply(clue: tuple, masks: list[int], full: int, reason: str, trace: list | None) -> bool | None:
    """Apply one clue; None when nothing changed, False on a contradiction, True otherwise."""
    kind, x, y = clue
    mx = masks[x]
    my = masks[y] if kind != "at" and kind != "not_at" else 0
    if kind == "at":
        nx, ny = mx & (1 << y), my
    elif kind == "not_at":
        nx, ny = mx & ~(1 << y), my
    elif kind == "same":
        nx = ny = mx & my
    elif kind == "not_same":
        nx = mx & ~my if my & (my - 1) == 0 else mx
        ny = my & ~mx if mx & (mx - 1) == 0 else my
    elif kind == "left_of":
        nx, ny = mx & (my >> 1), my & (mx << 1) & full
    elif kind == "next_to":
        nx, ny = mx & ((my << 1) | (my >> 1)) & full, my & ((mx << 1) | (mx >> 1)) & full
    else:  # before: x in a house left of y's rightmost option, y right of x's leftmost option
        nx = mx & ((1 << (my.bit_length() - 1)) - 1) if my else 0
        ny = my & ~((mx & -mx) * 2 - 1) & full if mx else 0
    changed = None
    if nx != mx:
        changed = _narrow(masks, x, nx, reason, trace)
        if not changed:
            return False
    if kind not in ("at", "not_at") and ny != my:
        changed = _narrow(masks, y, ny, reason, trace)
    return changed


def _all_different(masks: list[int], n: int, trace: list | None) -> bool | None:
    """Each attribute's values fill distinct houses; None when nothing changed."""
    full = (1 << n) - 1
    changed = None
    for a in range(0, len(masks), n):
        fixed = 0  # houses taken by a value whose house is known
        for v in range(a, a + n):
            m = masks[v]
            if m & (m - 1) == 0:
                if fixed & m:
                    return False
                fixed |= m
        once = twice = 0  # houses open to at least one / at least two values
        for v in range(a, a + n):
            m = masks[v]
            if m & (m - 1) and m & fixed:
                m &= ~fixed
                if not _narrow(masks, v, m, "elimination", trace):
                    return False
                changed = True
            twice |= once & m
            once |= m
        if once != full:  # a house no value of the attribute can take
            return False
        single = once & ~twice  # a house only one value can take: that value is there
        if single:
            for v in range(a, a + n):
                m = masks[v]
                if m & single and m & (m - 1):
                    only = m & single
                    if only & (only - 1) or not _narrow(masks, v, only, "elimination", trace):
                        return False
                    changed = True
    return changed


def _propagate(masks: list[int], clues: list[tuple], n: int, trace: list | None = None) -> bool:
    """Narrow ``masks`` in place to a fixpoint of the clues and the all-different rule; False on contradiction."""
    full = (1 << n) - 1
    while True:
        changed = False
        for i, clue in enumerate(clues):
            result = _apply(clue, masks, full, f"clue {i + 1}", trace)
            if result is False:
                return False
            changed = changed or bool(result)
        result = _all_different(masks, n, trace)
        if result is False:
            return False
        if not changed and not result:
            return True


def _branch_entity(masks: list[int]) -> int | None:
    """The unfixed entity with the fewest houses left, or None when every cell is fixed."""
    best, best_count = None, 99
    for e, m in enumerate(masks):
        if m & (m - 1):
            count = m.bit_count()
            if count < best_count:
                best, best_count = e, count
    return best


def count_solutions(clues: list[tuple], n: int, m: int, limit: int = 2) -> int:
    """Solutions of a puzzle of ``n`` houses and ``m`` attributes, counted up to ``limit``.

    Args:
        clues: ``(kind, entity, entity_or_house)`` tuples; entity ``a * n + v``.
        n: Houses.
        m: Attributes.
        limit: Stop counting here (2 decides uniqueness).

    Returns:
        The number of solutions, at most ``limit``.
    """
    stack = [[(1 << n) - 1] * (n * m)]
    found = 0
    while stack:  # depth-first, iterative
        masks = stack.pop()
        if not _propagate(masks, clues, n):
            continue
        e = _branch_entity(masks)
        if e is None:
            found += 1
            if found >= limit:
                return found
            continue
        for h in range(n):
            if masks[e] >> h & 1:
                child = masks.copy()
                child[e] = 1 << h
                stack.append(child)
    return found


def _two(rng: np.random.Generator, k: int) -> tuple[int, int]:
    """Two different numbers in ``range(k)`` (cheaper than ``rng.choice(k, 2, replace=False)``)."""
    first = int(rng.integers(k))
    return first, (first + 1 + int(rng.integers(k - 1))) % k


def _draw_clue(rng: np.random.Generator, kinds: list[str], cumulative: list[float], house: list[list[int]]) -> tuple:
    """One clue that is true of the solution (``house[a][v]`` is the house of value v of attribute a).

    ``cumulative`` holds the running sums of the kinds' weights.
    """
    m, n = len(house), len(house[0])
    kind = kinds[bisect.bisect_right(cumulative, float(rng.random()) * cumulative[-1])]
    a, b = _two(rng, m)
    if kind in ("at", "not_at"):
        v = int(rng.integers(n))
        h = house[a][v]
        if kind == "not_at":
            h = (h + 1 + int(rng.integers(n - 1))) % n
        return (kind, a * n + v, h)
    if kind == "same":
        h = k = int(rng.integers(n))
    elif kind == "not_same":
        h, k = _two(rng, n)
    else:  # positional clues may relate two values of one attribute
        b = int(rng.integers(m))
        h, k = sorted(_two(rng, n)) if kind == "before" else (int(rng.integers(n - 1)),) * 2
        if kind != "before":
            k = h + 1
            if kind == "next_to" and rng.random() < 0.5:
                h, k = k, h
    return (kind, a * n + house[a].index(h), b * n + house[b].index(k))


def _clues_for(rng: np.random.Generator, config: ZebraConfig, house: list[list[int]]) -> list[tuple]:
    """Draw clues until the solution is unique, then drop the ones it does not need."""
    n, m = config.houses, config.attributes
    kinds = [k for k in CLUE_KINDS if config.clue_mix.get(k, 0) > 0]
    cumulative = list(itertools.accumulate(float(config.clue_mix[k]) for k in kinds))
    clues: list[tuple] = []
    for _ in range(_MAX_BATCHES):
        for _ in range(n):
            clue = _draw_clue(rng, kinds, cumulative, house)
            if clue not in clues:
                clues.append(clue)
        if count_solutions(clues, n, m) == 1:
            break
    else:
        raise RuntimeError(f"no unique Zebra puzzle after {_MAX_BATCHES * n} clues: widen clue_mix ({config})")
    if config.reduce:
        for clue in [clues[int(j)] for j in rng.permutation(len(clues))]:
            rest = [c for c in clues if c != clue]
            if count_solutions(rest, n, m) == 1:
                clues = rest
    return clues


# ------------------------------------------------------------------------------------------ puzzle
def _phrase(attribute: int, value: str) -> str:
    return _ATTRIBUTES[attribute][1].format(value)


def _clue_text(clue: tuple, values: list[list[str]], n: int) -> str:
    kind, x, y = clue
    text = _TEXT[kind].format(
        x=_phrase(x // n, values[x // n][x % n]),
        y="" if kind in ("at", "not_at") else _phrase(y // n, values[y // n][y % n]),
        h=y + 1,
    )
    return text[0].upper() + text[1:]


def _solution_text(values: list[list[str]], house: list[list[int]]) -> str:
    n = len(values[0])
    rows = [[""] * len(values) for _ in range(n)]
    for a, column in enumerate(values):
        for v, value in enumerate(column):
            rows[house[a][v]][a] = value
    return "\n".join(f"House {h + 1}: {', '.join(row)}" for h, row in enumerate(rows))


def generate(rng: np.random.Generator, config: ZebraConfig) -> dict[str, Any]:
    """Draw one puzzle with a unique solution (checked by :func:`count_solutions`).

    Args:
        rng: The source of randomness (the same state gives the same puzzle).
        config: Size and clue mix.

    Returns:
        ``{"puzzle": str, "solution": str}``; ``solution`` is the answer in the answer format.

    Raises:
        RuntimeError: if the clue mix cannot make the solution unique (e.g. only ``not_same``).
    """
    n, m = config.houses, config.attributes
    values = []
    for _, _, pool in _ATTRIBUTES[:m]:
        picked = sorted(int(i) for i in rng.choice(len(pool), size=n, replace=False))
        values.append([pool[i] for i in picked])
    house = [[int(h) for h in rng.permutation(n)] for _ in range(m)]  # house[a][v]
    clues = _clues_for(rng, config, house)
    listing = "\n".join(f"- {name}: {', '.join(vals)}" for (name, _, _), vals in zip(_ATTRIBUTES, values))
    puzzle = (
        f"There are {n} houses in a row, numbered 1 to {n} from left to right. Each house has one value of "
        f"each attribute below, and each value belongs to exactly one house.\n{listing}\n\nClues:\n"
        + "\n".join(f"{i + 1}. {_clue_text(c, values, n)}" for i, c in enumerate(clues))
    )
    return {"puzzle": puzzle, "solution": _solution_text(values, house)}


# ------------------------------------------------------------------------------------------ answers
def parse_grid(text: str, n: int, m: int, attribute_of: Mapping[str, int]) -> list[list[str]] | None:
    """The ``n`` x ``m`` grid of an answer (lower-case values), or ``None`` if it is malformed.

    Args:
        text: The answer: ``n`` lines ``House <h>: <value>, ...``.
        n: Houses.
        m: Attributes.
        attribute_of: Lower-case value -> its attribute index.

    Returns:
        ``grid[h][a]``, the value of attribute ``a`` in house ``h + 1``; ``None`` when the lines,
        houses or values break the answer format (see the card), or a value is in two houses.
    """
    if len(text) > _MAX_ANSWER_CHARS:
        return None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) != n:
        return None
    grid: list[list[str] | None] = [None] * n
    for line in lines:
        match = _LINE.fullmatch(line)
        if match is None or not 1 <= int(match.group(1)) <= n or grid[int(match.group(1)) - 1] is not None:
            return None
        row: list[str | None] = [None] * m
        for value in (v.strip().lower() for v in match.group(2).split(",")):
            a = attribute_of.get(value)
            if a is None or row[a] is not None:
                return None
            row[a] = value
        if None in row:
            return None
        grid[int(match.group(1)) - 1] = row  # type: ignore[assignment]
    if any(len({row[a] for row in grid}) != n for a in range(m)):  # type: ignore[index]
        return None
    return grid  # type: ignore[return-value]


def _reference(solution: str) -> tuple[list[list[str]], dict[str, int]]:
    """The solution's grid and its value -> attribute map (each column is one attribute)."""
    rows = [line.split(":", 1)[1] for line in solution.strip().splitlines()]
    grid = [[v.strip().lower() for v in row.split(",")] for row in rows]
    return grid, {value: a for row in grid for a, value in enumerate(row)}


def _cells_right(completion: str, solution: str, prefill: str) -> float | None:
    """Share of cells right, or ``None`` when the answer is malformed."""
    text = extract_answer(completion, prefill=prefill)
    if text is None:
        return None
    reference, attribute_of = _reference(solution)
    n, m = len(reference), len(reference[0])
    grid = parse_grid(text, n, m, attribute_of)
    if grid is None:
        return None
    return sum(g == r for grow, rrow in zip(grid, reference) for g, r in zip(grow, rrow)) / (n * m)


def exact_reward(completion: str, *, solution: str, prefill: str = "", **_: Any) -> float:
    """1.0 iff the one answer is the solution, every cell right.

    >>> exact_reward(" x </think>\\n<answer>House 1: Bob, red\\nHouse 2: Alice, blue</answer>",
    ...              solution="House 1: Bob, red\\nHouse 2: Alice, blue")
    1.0
    """
    share = _cells_right(completion, solution, prefill)
    return 1.0 if share == 1.0 else 0.0


def partial_reward(completion: str, *, solution: str, prefill: str = "", **_: Any) -> float:
    """The share of cells right (0.0 for a malformed answer).

    >>> partial_reward(" x </think>\\n<answer>House 1: Alice, red\\nHouse 2: Bob, blue</answer>",
    ...                solution="House 1: Bob, red\\nHouse 2: Alice, blue")
    0.5
    """
    share = _cells_right(completion, solution, prefill)
    return 0.0 if share is None else share


# ------------------------------------------------------------------------------------------ oracle
def _parse_puzzle(puzzle: str) -> tuple[list[list[str]], list[tuple]]:
    """Values and clues back from a generated puzzle's text (the inverse of :func:`generate`'s text)."""
    header, _, clue_block = puzzle.partition("\n\nClues:\n")
    values = [line.split(": ", 1)[1].split(", ") for line in header.splitlines() if line.startswith("- ")]
    n = len(values[0])
    texts = {}
    for a, column in enumerate(values):
        for v, value in enumerate(column):
            texts[_phrase(a, value)] = a * n + v
    patterns = []
    for kind, template in _TEXT.items():
        pattern = re.escape(template).replace(re.escape("{x}"), "(?P<x>.+)").replace(re.escape("{y}"), "(?P<y>.+)")
        patterns.append((kind, re.compile(pattern.replace(re.escape("{h}"), "(?P<h>\\d+)"), re.IGNORECASE)))
    lookup = {k.lower(): e for k, e in texts.items()}
    clues = []
    for line in clue_block.splitlines():
        sentence = line.split(". ", 1)[1]
        for kind, pattern in patterns:
            match = pattern.fullmatch(sentence)
            if match and match.group("x").lower() in lookup:
                groups = match.groupdict()
                other = int(groups["h"]) - 1 if "h" in groups else lookup.get(groups["y"].lower())
                if other is not None:
                    clues.append((kind, lookup[match.group("x").lower()], other))
                    break
        else:
            raise ValueError(f"not a clue of a generated Zebra puzzle: {line!r}")
    return values, clues


def solve(problem: Mapping[str, Any]) -> str | None:
    """The oracle: the solver's deductions, one per cell, then the solution (continues :data:`PREFILL`).

    Args:
        problem: A problem with ``puzzle`` (as generated) and ``solution``.

    Returns:
        E.g. ``" Bob: house 2 (clue 3). red: house 2 (clue 1). ... </think>\\n<answer>\\nHouse 1: ...\\n</answer>"``,
        or ``None`` for a puzzle whose text is not in the generator's form (data from elsewhere).
    """
    try:
        values, clues = _parse_puzzle(str(problem["puzzle"]))
        n, m = len(values[0]), len(values)
        reference, _ = _reference(str(problem["solution"]))
        where = {value: h for h, row in enumerate(reference) for value in row}  # value -> its house
        target = {a * n + v: where[value.lower()] for a, column in enumerate(values) for v, value in enumerate(column)}
    except (ValueError, IndexError, KeyError):
        return None
    masks = [(1 << n) - 1] * (n * m)
    trace: list[tuple[int, int, str]] = []
    _propagate(masks, clues, n, trace)
    while (e := _branch_entity(masks)) is not None:  # a guess: the solution's house, the others contradict
        masks[e] = 1 << target[e]
        trace.append((e, target[e], "the other houses contradict the clues"))
        _propagate(masks, clues, n, trace)
    steps = [f"{values[e // n][e % n]}: house {h + 1} ({reason})" for e, h, reason in trace]
    return f" {'. '.join(steps)}. </think>\n<answer>\n{problem['solution']}\n</answer>"


# ------------------------------------------------------------------------------------------ task
_INSTRUCTION = " ".join(
    textwrap.dedent(
        """
        Show your work in <think> </think> tags. Then give the solution in <answer> </answer> tags,
        one line per house, written House <number>: <the house's value of each attribute, separated
        by commas>.
        """
    ).split()
)

TEMPLATE = ConversationTemplate(
    [
        COUNTDOWN_TEMPLATE.as_dicts()[0],  # the same system message as Countdown
        {"role": "user", "content": "{puzzle}\n\n" + _INSTRUCTION},
        {"role": "assistant", "content": PREFILL},
    ]
)

TASK = Task(
    name="Zebra",
    version=0,
    columns=("puzzle", "solution"),
    question_column="puzzle",
    answer_column="solution",
    template=TEMPLATE,
    rubric=Rubric([format_reward, exact_reward, partial_reward], [1.0, 1.0, 1.0], names=["format", "exact", "partial"]),
    correct_part="exact",
    config=ZebraConfig(),
    generate=generate,
    solve=solve,
    description="Logic grid puzzles (houses x attributes) with a unique solution.",
)

register_task(TASK)
