"""Rubrics: weighted reward functions, each reported by name.

A reward function is a plain module-level callable::

    def format_reward(completion: str, *, prefill: str = "", **columns) -> float

It receives the completion (text generated after the prompt), the template's assistant
``prefill`` and every column of the problem as keywords (``nums=..., target=..., question=...,
answer=...``); a function without ``**kwargs`` gets only the keywords it names. A keyword-style
function must take ``prefill`` or ``**kwargs``: that is how it is told from a seed-style one (below).
A :class:`Rubric` calls each function under a time limit; a function that raises
or runs past the limit scores ``0.0`` for that sample, the failure is counted per function and
logged, and scoring goes on. Reward functions should catch only their own parse failures, so a
bug shows up in :attr:`Rubric.failures` instead of looking like a bad policy.

A seed-style callable ``fn(completion, answer, question) -> float`` (AgileRL's ``reward_fn``: three
positional parameters, no ``prefill`` and no ``**kwargs``) is accepted anywhere a reward function
is, and is called positionally with the problem's ``answer`` and ``question`` (list values as
numpy arrays, as AgileRL's tensors were). :meth:`Rubric.from_callable` wraps one callable.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm_gym.timeout import CallTimeout, call_with_timeout

__all__ = ["Rubric", "Score", "RewardFunc"]

logger = logging.getLogger(__name__)

RewardFunc = Callable[..., float]


@dataclass(frozen=True)
class Score:
    """The reward of one completion.

    Attributes:
        total: Weighted sum of the parts.
        parts: Unweighted score of every reward function, by name.
        errors: Name to error text for the functions that failed (scored 0).
    """

    total: float
    parts: dict[str, float]
    errors: dict[str, str] = field(default_factory=dict)

    def correct(self, part: str) -> bool:
        """Exact accuracy: the part that means "right answer" (a task's ``correct_part``) scores full marks.

        Args:
            part: The rubric part's name.

        Returns:
            True when ``parts[part] >= 1.0`` (False when the part is missing).
        """
        return self.parts.get(part, 0.0) >= 1.0


def _positional_legacy(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` looks like AgileRL's ``fn(completion, answer, question)``.

    That is: at least three positional parameters, no ``**kwargs`` and no ``prefill`` parameter.
    A keyword-convention function always takes ``prefill`` or ``**kwargs`` (the rubric passes
    ``prefill=`` to every function), so the two conventions cannot be confused.
    """
    if isinstance(fn, _LegacyReward):
        return False
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind == p.VAR_KEYWORD or p.name == "prefill" for p in params):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _accepted_keywords(fn: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword names ``fn`` takes, or ``None`` when it takes ``**kwargs`` (it gets every column)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _as_array(value: Any) -> Any:
    # AgileRL handed list columns to reward_fn as tensors; seed 001 calls `.flatten()` on them.
    return np.asarray(value) if isinstance(value, (list, tuple)) else value


class _LegacyReward:
    """Adapter from ``fn(completion, answer, question)`` to the keyword convention."""

    def __init__(self, fn: Callable[[str, Any, Any], float]) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, completion: str, *, answer: Any = None, question: Any = None, **_: Any) -> float:
        return self.fn(completion, _as_array(answer), _as_array(question))


class Rubric:
    """Weighted reward functions with a per-call time limit.

    Args:
        funcs: Reward functions (keyword convention or seed-style, see the module docstring).
        weights: One weight per function; default 1.0 each.
        names: One name per function; default each function's ``__name__``.
        timeout: Seconds each call may take; ``None`` for no limit.

    Raises:
        ValueError: if the lengths differ, names repeat, or a weight is not finite.
    """

    def __init__(
        self,
        funcs: Sequence[RewardFunc],
        weights: Sequence[float] | None = None,
        *,
        names: Sequence[str] | None = None,
        timeout: float | None = 5.0,
    ) -> None:
        if not funcs:
            raise ValueError("a Rubric needs at least one reward function")
        weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
        names = [getattr(f, "__name__", type(f).__name__) for f in funcs] if names is None else list(names)
        if len(weights) != len(funcs) or len(names) != len(funcs):
            raise ValueError(
                f"got {len(funcs)} reward functions, {len(weights)} weights and {len(names)} names: "
                "give one weight and one name per function"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"reward function names must be unique, got {names}: pass names=[...]")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be finite numbers, got {weights}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout}")
        self.funcs = [_LegacyReward(f) if _positional_legacy(f) else f for f in funcs]
        self.weights = weights
        self.names = names
        self.timeout = timeout
        self.failures: Counter[str] = Counter()
        self.calls = 0
        self._keywords = [_accepted_keywords(f) for f in self.funcs]

    @classmethod
    def from_callable(cls, fn: Callable[..., float], *, timeout: float | None = 5.0) -> Rubric:
        """Wrap one plain reward callable.

        A callable with three positional parameters, no ``prefill`` and no ``**kwargs`` is treated
        as seed 001's ``fn(completion, answer, question)``; list-valued answer/question columns reach it
        as numpy arrays (as AgileRL's tensors did). Any other callable gets the keyword
        convention.

        Args:
            fn: The reward callable.
            timeout: Seconds each call may take.

        Returns:
            A one-part rubric named after ``fn``.
        """
        if isinstance(fn, Rubric):
            return fn
        return cls([fn], timeout=timeout)

    def copy(self) -> Rubric:
        """The same reward functions, weights, names and timeout, with its own failure counter.

        Every environment built from a task scores with a copy of the task's rubric, so the failures
        one env counts are its own.
        """
        fresh = copy.copy(self)
        fresh.failures, fresh.calls = Counter(), 0
        return fresh

    @property
    def positional_parts(self) -> tuple[str, ...]:
        """Names of the parts that are seed-style ``fn(completion, answer, question)`` callables.

        They need the problems to have ``answer`` and ``question`` columns (or aliases).
        """
        return tuple(n for n, f in zip(self.names, self.funcs, strict=True) if isinstance(f, _LegacyReward))

    @property
    def max_total(self) -> float:
        """Largest total reward, assuming each part scores in [0, 1]."""
        return float(sum(w for w in self.weights if w > 0))

    def score(self, completion: str, problem: Mapping[str, Any], prefill: str = "") -> Score:
        """Score one completion.

        Args:
            completion: Text generated after the prompt.
            problem: The problem's columns (passed to every function as keywords).
            prefill: The template's assistant prefill.

        Returns:
            The weighted total, every part by name and the errors of failed functions.
        """
        parts: dict[str, float] = {}
        errors: dict[str, str] = {}
        self.calls += 1
        columns = {"prefill": prefill, **problem}
        for name, fn, accepted in zip(self.names, self.funcs, self._keywords, strict=True):
            kwargs = columns if accepted is None else {k: v for k, v in columns.items() if k in accepted}
            try:
                value = float(call_with_timeout(fn, self.timeout, completion, **kwargs))
                if not math.isfinite(value):
                    raise ValueError(f"returned {value}")
            except CallTimeout:
                value, errors[name] = 0.0, f"timed out after {self.timeout}s"
            except Exception as exc:  # a reward bug must not stop training: score 0, count, log
                value, errors[name] = 0.0, f"{type(exc).__name__}: {exc}"
            parts[name] = value
        for name, error in errors.items():
            self.failures[name] += 1
            logger.warning(
                "reward function %r failed (%s); scored 0 (%d failures so far)", name, error, self.failures[name]
            )
        total = sum(w * parts[n] for n, w in zip(self.names, self.weights, strict=True))
        return Score(total=float(total), parts=parts, errors=errors)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}×{w:g}" for n, w in zip(self.names, self.weights, strict=True))
        return f"Rubric({inner}, timeout={self.timeout})"
