"""Lineage: what happened to whom, as plain JSON-able events appended to the agents they describe.

A clone starts with a copy of its parent's list, so an agent's lineage is its whole ancestry::

    {"step": 120, "event": "elite", "agent": 3, "parent": 3, "fitness": 0.8, "generation": 2}
    {"step": 120, "event": "selected", "agent": 7, "parent": 3, "fitness": 0.8, "generation": 2,
     "contestants": [3, 5]}
    {"step": 120, "event": "mutation", "agent": 7, "hp": "lr", "old": 0.001, "new": 0.00112}

``step`` is the ``agent.steps`` of the agent (the parent for selection events) when it happened;
``generation`` counts the ``select`` calls of the :class:`~llm_gym.algorithms.evolution.selection.TournamentSelection`
that made the event.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = ["lineage_events"]


def lineage_events(population: Iterable[Any]) -> list[dict[str, Any]]:
    """All lineage events of a population, each once, sorted by step.

    Clones inherit their parent's lineage, so the same event appears in many agents; this
    de-duplicates them (by content) for plots and logs.

    Args:
        population: Agents with a ``lineage`` list.

    Returns:
        The distinct events, stably sorted by ``step``.
    """
    seen: set[str] = set()
    events: list[dict[str, Any]] = []
    for agent in population:
        for event in getattr(agent, "lineage", []):
            key = json.dumps(event, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                events.append(dict(event))
    events.sort(key=lambda e: e.get("step", 0))
    return events
