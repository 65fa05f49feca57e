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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["lineage_events", "merge_events"]


def _key(event: Mapping[str, Any]) -> str:
    # By content, stable across a JSON round trip (a resumed run's events come back from JSON).
    return json.dumps(event, sort_keys=True, default=str)


def lineage_events(population: Iterable[Any]) -> list[dict[str, Any]]:
    """All lineage events of a population, each once, sorted by step.

    Clones inherit their parent's lineage, so the same event appears in many agents; this
    de-duplicates them (by content) for plots and logs.

    Args:
        population: Agents with a ``lineage`` list.

    Returns:
        The distinct events, stably sorted by ``step``.
    """
    return merge_events([], population)


def merge_events(known: Sequence[Mapping[str, Any]], population: Iterable[Any]) -> list[dict[str, Any]]:
    """``known`` events, then the population's events not among them (each once, sorted by step).

    A run keeps every event it has seen, including those of agents selection has since dropped;
    this adds the current population's new ones.

    Args:
        known: Events kept so far, in their order.
        population: Agents with a ``lineage`` list.

    Returns:
        A new list.
    """
    seen = {_key(e) for e in known}
    new: list[dict[str, Any]] = []
    for agent in population:
        for event in getattr(agent, "lineage", []):
            key = _key(event)
            if key not in seen:
                seen.add(key)
                new.append(dict(event))
    new.sort(key=lambda e: e.get("step", 0))
    return [dict(e) for e in known] + new
