"""The numbers of an evaluation, from its rollout records: the same for every kind of policy.

* per-part rewards and the total: means over the scored rollouts;
* exact accuracy with its standard error: the standard error of the mean over *problems* of each
  problem's share of correct samples (``std(ddof=1) / sqrt(P)``), since the ``R`` samples of one
  problem are not independent; with ``R = 1`` this is the usual ``sqrt(p (1 - p) / (P - 1))``;
* pass@k for ``k = 1`` and ``k = R``: the unbiased estimator of Chen et al. (2021),
  ``1 - C(n - c, k) / C(n, k)`` for a problem with ``n`` scored samples of which ``c`` are correct,
  averaged over the problems with at least ``k`` scored samples;
* mean completion tokens (when the policy reports them) and the failed requests, which are
  counted here and never scored as wrong answers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from llm_gym.rollout_record import RolloutRecord

__all__ = ["EvalReport", "pass_at_k", "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: the chance that ``k`` of its ``n`` samples, drawn without
    replacement, hold at least one of the ``c`` correct ones.

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 2), pass_at_k(4, 0, 4), pass_at_k(4, 3, 2)
    (0.25, 0.5, 0.0, 1.0)

    Raises:
        ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(frozen=True)
class EvalReport:
    """Summary of an evaluation (see the module docstring)."""

    problems: int
    """Problems with at least one scored sample."""
    rollouts: int
    """Scored rollouts."""
    failed: int
    """Requests that failed after their retries (not scored)."""
    rewards: dict[str, float] = field(default_factory=dict)
    """Mean of each rubric part, then ``total``."""
    accuracy: float = float("nan")
    """Mean exact accuracy over the scored rollouts."""
    accuracy_stderr: float = float("nan")
    """Standard error of ``accuracy`` over problems (nan with fewer than 2)."""
    pass_at: dict[int, float] = field(default_factory=dict)
    """pass@k by ``k`` (1 and R)."""
    mean_completion_tokens: float = float("nan")
    """Mean tokens of a completion (nan when the policy does not report them)."""

    def rows(self) -> list[tuple[str, float | int]]:
        """``(name, value)`` rows for a table: reward parts, total, accuracy, its error, pass@k, tokens, counts."""
        rows: list[tuple[str, float | int]] = list(self.rewards.items())
        rows += [("exact accuracy", self.accuracy), ("accuracy std error", self.accuracy_stderr)]
        rows += [(f"pass@{k}", v) for k, v in sorted(self.pass_at.items())]
        rows += [("mean completion tokens", self.mean_completion_tokens)]
        rows += [("rollouts", self.rollouts), ("failed requests", self.failed)]
        return rows


def summarize(records: Sequence[RolloutRecord], samples: int) -> EvalReport:
    """The :class:`EvalReport` of an evaluation's records.

    Args:
        records: One record per (problem, sample), failed ones included.
        samples: ``R``, the samples asked per problem (pass@R).

    Returns:
        The report.
    """
    scored = [r for r in records if not r.failed]
    failed = len(records) - len(scored)
    if not scored:
        return EvalReport(problems=0, rollouts=0, failed=failed)
    parts = list(dict.fromkeys(name for r in scored for name in r.parts))
    rewards = {name: sum(r.parts.get(name, 0.0) for r in scored) / len(scored) for name in parts}
    rewards["total"] = sum(float(r.reward or 0.0) for r in scored) / len(scored)
    by_problem: dict[int, list[bool]] = defaultdict(list)
    for r in scored:
        by_problem[r.problem].append(bool(r.correct))
    shares = [sum(v) / len(v) for v in by_problem.values()]
    stderr = float("nan")
    if len(shares) > 1:
        mean = sum(shares) / len(shares)
        stderr = math.sqrt(sum((s - mean) ** 2 for s in shares) / (len(shares) - 1) / len(shares))
    pass_at = {}
    for k in sorted({1, samples}):
        eligible = [v for v in by_problem.values() if len(v) >= k]
        pass_at[k] = sum(pass_at_k(len(v), sum(v), k) for v in eligible) / len(eligible) if eligible else float("nan")
    tokens = [r.completion_tokens for r in scored if r.completion_tokens is not None]
    return EvalReport(
        problems=len(by_problem), rollouts=len(scored), failed=failed, rewards=rewards,
        accuracy=sum(bool(r.correct) for r in scored) / len(scored), accuracy_stderr=stderr, pass_at=pass_at,
        mean_completion_tokens=sum(tokens) / len(tokens) if tokens else float("nan"),
    )  # fmt: skip
