"""The main job's final report: SFT start vs elite on the test split, exact accuracy with its standard error.

``llm-gym train`` prints :func:`results_table` of the summary that
:func:`~llm_gym.algorithms.recipe.run_training` writes to ``summary.json``; :func:`build_summary`
makes that summary. Its ``sft`` and ``elite`` entries are evaluation metrics of the test split (which
neither training nor selection ever reads) and keep every key they had (``reward/total``,
``reward/<part>``, ``accuracy``, ``problems``), with ``accuracy_se`` added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from llm_gym.table import format_table

__all__ = ["accuracy_se", "build_summary", "results_table", "with_standard_error"]


def accuracy_se(accuracy: float, problems: float) -> float:
    """Standard error of an accuracy measured on ``problems`` independent problems: ``sqrt(p (1 - p) / n)``.

    Example:
        >>> round(accuracy_se(0.25, 400), 4)
        0.0217
    """
    if problems <= 0 or math.isnan(accuracy):
        return math.nan
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / problems)


def with_standard_error(metrics: Mapping[str, float]) -> dict[str, float]:
    """A copy of an evaluation's metrics with ``accuracy_se`` added (NaN without ``accuracy``)."""
    out = dict(metrics)
    out["accuracy_se"] = accuracy_se(float(out.get("accuracy", math.nan)), float(out.get("problems", 0.0)))
    return out


def build_summary(
    task: str, sft: Mapping[str, float], elite: Mapping[str, float], **extra: Any
) -> dict[str, Any]:
    """The run's ``summary.json``: ``task``, ``sft`` and ``elite`` test-split metrics (with ``accuracy_se``),
    ``gain`` (elite minus SFT exact accuracy) and its standard error ``gain_se``, then ``extra``.

    Args:
        task: The environment id.
        sft: The SFT start's evaluation on the test split.
        elite: The elite's evaluation on the same problems.
        **extra: More entries (hyper-parameters, seconds, run folder, validation metrics).

    Returns:
        The summary.
    """
    sft_m, elite_m = with_standard_error(sft), with_standard_error(elite)
    gain = float(elite_m.get("accuracy", math.nan)) - float(sft_m.get("accuracy", math.nan))
    # Unpaired: conservative for the same problems (the paired difference has a smaller error).
    gain_se = math.sqrt(sft_m["accuracy_se"] ** 2 + elite_m["accuracy_se"] ** 2)
    return {"task": task, "sft": sft_m, "elite": elite_m, "gain": gain, "gain_se": gain_se, **extra}


def results_table(summary: Mapping[str, Any]) -> str:
    """SFT start vs elite: problems, exact accuracy +- s.e., total reward and every reward part.

    Args:
        summary: As :func:`build_summary` returns it (or a ``summary.json`` read back).

    Returns:
        The table, with a last line giving the gain in exact accuracy.
    """
    rows = {"SFT start": summary["sft"], "elite (GRPO)": summary["elite"]}
    parts = sorted({k for m in rows.values() for k in m if k.startswith("reward/") and k != "reward/failures"})
    header = ["model", "problems", "exact accuracy", "+- s.e.", *(k.removeprefix("reward/") for k in parts)]
    body = [
        [name, int(m.get("problems", 0)), float(m.get("accuracy", math.nan)),
         float(m.get("accuracy_se", accuracy_se(m.get("accuracy", math.nan), m.get("problems", 0)))),
         *(float(m.get(k, math.nan)) for k in parts)]
        for name, m in rows.items()
    ]  # fmt: skip
    gain, gain_se = summary.get("gain"), summary.get("gain_se")
    table = format_table(body, header)
    if gain is None or math.isnan(gain):
        return table
    return f"{table}\ngain in exact accuracy: {100 * gain:+.1f} points (+- {100 * gain_se:.1f} s.e.)"
