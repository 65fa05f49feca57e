"""Selection: elitism plus tournaments build the next generation (AgileRL's ``TournamentSelection``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["TournamentSelection", "agent_score"]

logger = logging.getLogger(__name__)


def agent_score(agent: Any, eval_loop: int = 1) -> float:
    """Selection score of an agent: the mean of its last ``eval_loop`` fitness values.

    NaN scores rank below every real score (a failed evaluation must not win a tournament).

    Args:
        agent: An agent with a ``fitness`` list.
        eval_loop: How many of the latest evaluations to average (AgileRL's ``eval_loop``).

    Returns:
        The score, ``-inf`` when the recent fitness values are NaN.

    Raises:
        ValueError: If the agent has no fitness yet.
    """
    fitness = list(getattr(agent, "fitness", None) or [])
    if not fitness:
        raise ValueError(
            f"Agent {getattr(agent, 'index', '?')} has no fitness yet: evaluate every agent (append "
            "to agent.fitness) before tournament selection."
        )
    recent = [float(f) for f in fitness[-eval_loop:]]
    score = sum(recent) / len(recent)
    return -math.inf if math.isnan(score) else score


def _release(agent: Any) -> None:
    release = getattr(agent, "release", None)
    if callable(release):
        release()


class TournamentSelection:
    """Tournament selection with elitism (AgileRL's ``TournamentSelection``).

    ``select`` builds a new population of ``population_size`` clones: the elite (best score, ties
    to the lowest ``index``) first when ``elitism``, then the winner of each tournament. A
    tournament draws ``tournament_size`` distinct agents (all, if fewer) with this object's seeded
    generator; the best score wins, ties to the lowest ``index``. The elite clone keeps its parent's
    id (the same individual lives on); other clones get new ids above any seen so far. Agents that
    win nothing are released before cloning, each parent right after its last clone (low peak
    memory).

    Args:
        tournament_size: Agents per tournament (>= 1; 1 means uniform random parents).
        elitism: Keep a clone of the best agent in slot 0.
        population_size: Size of the returned population (>= 1).
        eval_loop: Score = mean of the last ``eval_loop`` fitness values (>= 1).
        rand_seed: Seed of the selection generator; None draws fresh entropy.

    Raises:
        ValueError: On a non-positive size or ``eval_loop``.
    """

    def __init__(
        self,
        tournament_size: int,
        elitism: bool,
        population_size: int,
        eval_loop: int = 1,
        rand_seed: int | None = None,
    ) -> None:
        for name, value in (
            ("tournament_size", tournament_size),
            ("population_size", population_size),
            ("eval_loop", eval_loop),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TournamentSelection {name}={value!r} must be an int >= 1.")
        self.tournament_size = tournament_size
        self.elitism = bool(elitism)
        self.population_size = population_size
        self.eval_loop = eval_loop
        self.rng = np.random.default_rng(rand_seed)
        self._next_id = 0
        self.generation = 0  # number of select() calls so far, stamped on selection events

    def select(self, population: Sequence[Any]) -> tuple[Any, list[Any]]:
        """Select the elite and the next generation.

        Args:
            population: Evaluated agents (each with at least one fitness value).

        Returns:
            ``(elite, new_population)``. ``elite`` is a member of ``new_population`` (slot 0) when
            ``elitism``; otherwise a clone kept outside the population, which the caller should
            ``release()`` once it has been saved. All agents of ``population`` are released.

        Raises:
            ValueError: On an empty population, an agent without fitness, or duplicate ids.
            RuntimeError: If ``clone`` returns the same object or shares its ``hps`` dict.
        """
        if not population:
            raise ValueError("TournamentSelection.select got an empty population.")
        ids = [int(a.index) for a in population]
        if len(set(ids)) != len(ids):
            raise ValueError(f"Agent ids must be unique, got {ids}: give every agent its own index.")
        scores = [agent_score(a, self.eval_loop) for a in population]
        n = len(population)
        # Ascending (-score, id): the best first, ties to the lowest id.
        rank_key = lambda i: (-scores[i], ids[i])  # noqa: E731
        elite_pos = min(range(n), key=rank_key)
        self._next_id = max(self._next_id, max(ids) + 1)
        self.generation += 1

        # Plan first (all RNG draws), clone afterwards: this fixes the RNG stream independently of
        # what clone() does and tells us when each old agent is no longer needed.
        plan: list[tuple[int, int, dict[str, Any]]] = []  # (parent position, new id, event)
        # The elite entry always comes first; without elitism it becomes a detached clone.
        plan.append((elite_pos, ids[elite_pos], {"event": "elite"}))
        target = self.population_size + (0 if self.elitism else 1)
        k = min(self.tournament_size, n)
        while len(plan) < target:
            contestants = [int(i) for i in self.rng.choice(n, size=k, replace=False)]
            winner = min(contestants, key=rank_key)
            event = {"event": "selected", "contestants": [ids[i] for i in contestants]}
            plan.append((winner, self._next_id, event))
            self._next_id += 1

        last_use = {pos: j for j, (pos, _, _) in enumerate(plan)}
        for pos, agent in enumerate(population):
            if pos not in last_use:
                _release(agent)
        children = []
        for j, (pos, new_id, extra) in enumerate(plan):
            parent = population[pos]
            children.append(self._clone(parent, new_id, extra, scores[pos], self.generation))
            if last_use[pos] == j:
                _release(parent)

        elite = children[0]
        new_population = children if self.elitism else children[1:]
        logger.info(
            "selection: elite agent %d (score %.4f); new population %s",
            ids[elite_pos],
            scores[elite_pos],
            [a.index for a in new_population],
        )
        return elite, new_population

    @staticmethod
    def _clone(parent: Any, new_id: int, extra: Mapping[str, Any], score: float, generation: int) -> Any:
        child = parent.clone(index=new_id)
        if child is parent or getattr(child, "hps", None) is parent.hps:
            raise RuntimeError(
                f"{type(parent).__name__}.clone() returned an object sharing state with its "
                "parent: clone must copy hps (and adapter/optimizer state) so that mutating one "
                "agent cannot change another."
            )
        if child.lineage is parent.lineage:
            child.lineage = list(parent.lineage)
        event = {
            "step": int(parent.steps),
            "event": extra["event"],
            "agent": new_id,
            "parent": int(parent.index),
            "fitness": score,
            "generation": generation,
        }
        if "contestants" in extra:
            event["contestants"] = list(extra["contestants"])
        child.lineage.append(event)
        logger.debug("selection: %s", event)
        return child

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for resuming: the generator state and the next free id."""
        return {"rng": self.rng.bit_generator.state, "next_id": self._next_id, "generation": self.generation}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Args:
            state: A dict from :meth:`state_dict`.
        """
        self.rng.bit_generator.state = state["rng"]
        self._next_id = int(state["next_id"])
        self.generation = int(state.get("generation", 0))
