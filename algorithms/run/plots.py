"""The learning-curve plot of a run: every agent's fitness over training, selections and mutations marked."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_learning_curve"]


def plot_learning_curve(
    records: Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str],
    events: Sequence[Mapping[str, Any]] = (),
    title: str = "Population fitness",
    max_fitness: float | None = None,
) -> Path:
    """Plot every agent's fitness over training, with selections and mutations marked.

    Each agent is one line (fitness vs step). A dashed grey segment joins a parent's last point
    before a ``selected``/``elite`` event to its clone's first point; mutations are marked with a
    triangle labelled by the mutated hyper-parameter; a black line follows the population best.

    Args:
        records: Fitness evaluations: mappings with ``step``, ``agent`` and ``fitness``.
        path: PNG file to write (parent directories are created).
        events: Lineage events (see :func:`llm_gym.algorithms.evolution.lineage.lineage_events`).
        title: Figure title.
        max_fitness: If given, a dotted reference line (e.g. the maximum reward).

    Returns:
        The PNG path.

    Raises:
        ValueError: If there are no records.
    """
    # The object-oriented API renders with Agg without touching pyplot's global backend state.
    import matplotlib
    from matplotlib.figure import Figure

    series: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for rec in records:
        series[int(rec["agent"])].append((int(rec["step"]), float(rec["fitness"])))
    if not series:
        raise ValueError("plot_learning_curve got no fitness records: evaluate the population first.")
    for points in series.values():
        points.sort()

    def value_at(agent: int, step: int, after: bool) -> tuple[int, float] | None:
        points = series.get(agent, [])
        picked = [p for p in points if (p[0] >= step if after else p[0] <= step)]
        if not picked:
            return None
        return picked[0] if after else picked[-1]

    fig = Figure(figsize=(10, 6), dpi=100)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10"]
    label_agents = len(series) <= 12  # beyond that a legend hides the plot
    for n, (agent, points) in enumerate(sorted(series.items())):
        steps, values = zip(*points)
        label = f"agent {agent}" if label_agents else None
        ax.plot(steps, values, marker="o", markersize=3, lw=1.2, color=cmap(n % 10), label=label)
    best: dict[int, float] = {}
    for points in series.values():
        for step, value in points:
            best[step] = max(best.get(step, -math.inf), value)
    ax.plot(sorted(best), [best[s] for s in sorted(best)], color="black", lw=2.0, label="best")

    for event in events:
        kind, step, agent = event.get("event"), int(event.get("step", 0)), event.get("agent")
        if kind in ("selected", "elite") and agent is not None:
            start = value_at(int(event["parent"]), step, after=False)
            end = value_at(int(agent), step, after=True)
            if start and end and int(event["parent"]) != int(agent):
                ax.plot([start[0], end[0]], [start[1], end[1]], ls="--", lw=0.8, color="grey")
            if kind == "elite" and start:
                ax.plot(*start, marker="*", markersize=12, color="gold", markeredgecolor="black")
        elif kind == "mutation" and agent is not None:
            at = value_at(int(agent), step, after=True) or value_at(int(agent), step, after=False)
            if at:
                ax.plot(*at, marker="^", markersize=8, color="red", markeredgecolor="black")
                ax.annotate(
                    str(event.get("hp", "")), at, textcoords="offset points", xytext=(4, 6), fontsize=7
                )
    if max_fitness is not None:
        ax.axhline(max_fitness, ls=":", color="grey", lw=1.0)
    ax.set_xlabel("training step")
    ax.set_ylabel("fitness")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out
