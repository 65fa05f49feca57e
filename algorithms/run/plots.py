"""The learning-curve plot of a run: every agent's fitness over training, selections and mutations marked."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["label_slots", "plot_learning_curve"]


def label_slots(points: Sequence[tuple[int, float]]) -> list[tuple[float, int]]:
    """Where the mutation labels of a plot go: per label its anchor height and its row above it.

    Every label of one step is stacked in its own row above the highest marked point of that step
    (labels of nearby points at one step, e.g. 0.320 and 0.325, would otherwise print over each
    other); the lowest point gets the lowest row.

    Args:
        points: The marked ``(step, value)`` of each label, in drawing order.

    Returns:
        Per label, in the same order, ``(anchor value, row)``: the text sits ``row`` rows above
        ``(step, anchor value)``.
    """
    top: dict[int, float] = {}
    for step, value in points:
        top[step] = max(top.get(step, -math.inf), value)
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    rows: dict[int, int] = {}
    used: dict[int, int] = defaultdict(int)
    for i in order:
        rows[i] = used[points[i][0]]
        used[points[i][0]] += 1
    return [(top[step], rows[i]) for i, (step, _) in enumerate(points)]


def plot_learning_curve(
    records: Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str],
    events: Sequence[Mapping[str, Any]] = (),
    title: str = "Population fitness",
    max_fitness: float | None = None,
    value: str = "fitness",
    ylabel: str | None = None,
) -> Path:
    """Plot every agent's fitness (or another evaluated value) over training, with selections and mutations.

    Each agent is one line (value vs step). A dashed grey segment joins a parent's last point
    before a ``selected``/``elite`` event to its clone's first point; mutations are marked with a
    triangle labelled ``a<agent> <hyper-parameter>``, labels at the same step stacked so none
    overlaps; a black line follows the population best. Records at step 0 (the starting model,
    e.g. the SFT start) are drawn as the start of every line, with a dotted line at their level.
    The legend sits outside the axes, right of the data.

    Args:
        records: Evaluations: mappings with ``step``, ``agent`` and ``value``.
        path: PNG file to write (parent directories are created).
        events: Lineage events (see :func:`llm_gym.algorithms.evolution.lineage.lineage_events`).
        title: Figure title.
        max_fitness: If given, a dotted reference line (e.g. the maximum reward).
        value: The record key to plot: ``"fitness"`` or ``"accuracy"`` (exact accuracy).
        ylabel: Y-axis title; default ``value``.

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
        if value in rec:
            series[int(rec["agent"])].append((int(rec["step"]), float(rec[value])))
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

    fig = Figure(figsize=(11, 6), dpi=100)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10"]
    label_agents = len(series) <= 24  # the legend sits outside the axes: it hides no data
    for n, (agent, points) in enumerate(sorted(series.items())):
        steps, values = zip(*points)
        label = f"agent {agent}" if label_agents else None
        ax.plot(steps, values, marker="o", markersize=3, lw=1.2, color=cmap(n % 10), label=label)
    best: dict[int, float] = {}
    for points in series.values():
        for step, value in points:
            best[step] = max(best.get(step, -math.inf), value)
    ax.plot(sorted(best), [best[s] for s in sorted(best)], color="black", lw=2.0, label="best")
    start = [v for points in series.values() for step, v in points if step == 0]
    if start:
        ax.axhline(max(start), ls=":", color="tab:grey", lw=1.2, label=f"start (step 0): {max(start):.3f}")
    mutations: list[tuple[tuple[int, float], str]] = []  # (marked point, label), placed after the loop
    last_step = max((s for points in series.values() for s, _ in points), default=0)

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
                mutations.append((at, f"a{agent} {event.get('hp', '')}"))
    slots = label_slots([at for at, _ in mutations])
    for ((step, _), text), (anchor, row) in zip(mutations, slots, strict=True):
        # Near the right edge a label would run off the axes (into the legend): put it left of the point.
        left = last_step > 0 and step >= 0.85 * last_step
        ax.annotate(
            text, (step, anchor), textcoords="offset points", xytext=(-5 if left else 5, 6 + 10 * row),
            ha="right" if left else "left", fontsize=7,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
        )
    if max_fitness is not None:
        ax.axhline(max_fitness, ls=":", color="grey", lw=1.0)
    # Headroom above the highest point for the stacked mutation labels (one row of text ~ 4 %).
    values = [v for points in series.values() for _, v in points if math.isfinite(v)]
    if values:
        low, high = min(values), max(values)
        span = (high - low) or max(abs(high), 1.0) * 0.1
        rows = max((row + 1 for _, row in slots), default=0)
        ax.set_ylim(low - 0.05 * span, high + span * (0.08 + 0.05 * rows))
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel or value)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0.0)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out
