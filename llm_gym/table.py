"""Plain-text tables for the command line and the main job's final report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_table", "held_out_table"]


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table with right-aligned numbers.

    Args:
        rows: Table rows; floats print with 3 decimals.
        header: Column titles.

    Returns:
        The table as a string (no trailing newline).
    """

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    cells = [[cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(header))]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    for row in cells:
        lines.append(
            " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True))
        )
    return "\n".join(lines)


def held_out_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Format ``{model: evaluation metrics}`` as one row per model: reward parts and exact accuracy.

    Args:
        rows: Metrics as the rollout's evaluation returns them (``reward/<part>``, ``accuracy``).

    Returns:
        The table.
    """
    keys = sorted({k for m in rows.values() for k in m if k.startswith("reward/") and k != "reward/failures"})
    header = ["model", *(k.removeprefix("reward/") for k in keys), "exact accuracy"]
    body = [[name, *(m.get(k, float("nan")) for k in keys), m.get("accuracy", float("nan"))] for name, m in rows.items()]
    return format_table(body, header)
