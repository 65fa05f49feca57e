"""Evolutionary hyper-parameter search for a population of LLM agents.

Three pieces, named after AgileRL so its scripts port with only their imports changed:

* :class:`RLParameter` / :class:`HyperparameterConfig`: the mutable genes and their ranges.
* :class:`TournamentSelection`: elitism plus tournaments build the next generation (clones).
* :class:`Mutations`: each agent either keeps its genes or has one RL hyper-parameter perturbed.

The agents are anything that follows this small protocol (the GRPO agent does)::

    agent.hps: dict[str, float | int]   # current hyper-parameters
    agent.set_hp(name, value) -> None   # applies a new value (optimizer lr, sampler temperature, ...)
    agent.fitness: list[float]          # evaluation history, last = current
    agent.index: int                    # unique id across the run (new clones get new ids)
    agent.lineage: list[dict]           # events, see below
    agent.steps: int                    # training steps done
    agent.clone(index) -> agent         # independent copy (adapter, optimizer, hps, fitness, lineage)
    agent.release() -> None             # optional: frees a discarded agent's adapter

Lineage events are plain JSON-able dicts, appended to the agent they describe (a clone starts with a
copy of its parent's list, so an agent's lineage is its whole ancestry)::

    {"step": 120, "event": "elite", "agent": 3, "parent": 3, "fitness": 0.8, "generation": 2}
    {"step": 120, "event": "selected", "agent": 7, "parent": 3, "fitness": 0.8, "generation": 2,
     "contestants": [3, 5]}
    {"step": 120, "event": "mutation", "agent": 7, "hp": "lr", "old": 0.001, "new": 0.00112}

``step`` is the ``agent.steps`` of the agent (the parent for selection events) when it happened;
``generation`` counts the ``select`` calls of the :class:`TournamentSelection` that made the event.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from llm_gym.algorithms.evolution.genes import HyperparameterConfig, Number, RLParameter, mutate_value

__all__ = [
    "EvolvableAgent",
    "HyperparameterConfig",
    "Mutations",
    "RLParameter",
    "TournamentSelection",
    "agent_score",
    "lineage_events",
    "mutate_value",
]

logger = logging.getLogger(__name__)


@runtime_checkable
class EvolvableAgent(Protocol):
    """The attributes and methods selection and mutation rely on (see the module docstring)."""

    hps: dict[str, Number]
    fitness: list[float]
    index: int
    lineage: list[dict[str, Any]]
    steps: int

    def set_hp(self, name: str, value: Number) -> None: ...

    def clone(self, index: int) -> EvolvableAgent: ...


# --------------------------------------------------------------------------------------------------
# Fitness and lineage helpers
# --------------------------------------------------------------------------------------------------


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


_MISSING = object()


def _get_hp(agent: Any, name: str) -> Any:
    # agent.hps may be a dict (the protocol) or a dataclass of hyper-parameters; fall back to an
    # attribute/property of the agent itself (e.g. a derived ``clip_coef``).
    hps = agent.hps
    value = hps.get(name, _MISSING) if isinstance(hps, Mapping) else getattr(hps, name, _MISSING)
    return getattr(agent, name, _MISSING) if value is _MISSING else value


def _set_hp(agent: Any, name: str, value: Number) -> None:
    setter = getattr(agent, "set_hp", None) or agent.set_hyperparameter
    setter(name, value)


def _release(agent: Any) -> None:
    release = getattr(agent, "release", None)
    if callable(release):
        release()


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Mutation
# --------------------------------------------------------------------------------------------------

_ARCHITECTURE_OPTIONS = ("architecture", "new_layer_prob", "parameters", "activation")


class Mutations:
    """Hyper-parameter mutations of LLM agents (AgileRL's ``Mutations``, RL hyper-parameters only).

    Each agent gets an option drawn with probabilities proportional to ``no_mutation`` and ``rl_hp``
    (zero weights dropped; no ``no_mutation`` in the pre-training mutation, as in AgileRL). ``rl_hp``
    picks one gene uniformly and applies :func:`mutate_value` with noise ``N(0, mutation_sd)``.
    Draws, all from one seeded generator: the options for all targets (one ``choice`` call), then
    per mutated agent in order one gene index (``integers``) and one noise value (``normal``).
    AgileRL's architecture/parameter/activation options mean nothing for a LoRA adapter on a frozen
    base: they are accepted, for signature compatibility, only as 0.

    Elite: AgileRL defaults to ``mutate_elite=True``; here it is ``False``. The elite's
    hyper-parameters earned its fitness: one unchanged copy keeps the best configuration alive each
    generation, and the elite object (``new_population[0]``) is what the caller saves, so its saved
    hyper-parameters stay those its lineage records. An agent is the elite when its latest lineage
    event is ``"elite"``, whatever its slot.

    Args:
        no_mutation: Relative probability of leaving an agent unchanged (>= 0).
        architecture: AgileRL architecture mutation probability; must be 0.
        new_layer_prob: AgileRL new-layer probability; must be 0.
        parameters: AgileRL weight-noise mutation probability; must be 0.
        activation: AgileRL activation mutation probability; must be 0.
        rl_hp: Relative probability of an RL hyper-parameter mutation (>= 0).
        mutation_sd: Standard deviation of the multiplicative noise (>= 0).
        activation_selection: Accepted and ignored (AgileRL compatibility).
        mutate_elite: Also mutate the current elite (see above).
        rand_seed: Seed of the mutation generator; None draws fresh entropy.
        device: Accepted and ignored: hyper-parameter mutation touches no tensors.
        accelerator: Accepted and ignored, as ``device``.
        hp_config: Genes to mutate. None uses the agent's own ``hp_config`` attribute if it has
            one, else :meth:`HyperparameterConfig.default` restricted to the genes in ``agent.hps``.

    Raises:
        ValueError: On a negative probability or ``mutation_sd``, or a non-zero architecture option.
    """

    def __init__(
        self,
        no_mutation: float,
        architecture: float = 0.0,
        new_layer_prob: float = 0.0,
        parameters: float = 0.0,
        activation: float = 0.0,
        rl_hp: float = 0.0,
        mutation_sd: float = 0.1,
        activation_selection: Sequence[str] | None = None,
        mutate_elite: bool = False,
        rand_seed: int | None = None,
        device: str = "cpu",
        accelerator: Any = None,
        hp_config: HyperparameterConfig | None = None,
    ) -> None:
        for name, value in (("no_mutation", no_mutation), ("rl_hp", rl_hp), ("mutation_sd", mutation_sd)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Mutations {name}={value!r} must be a finite number >= 0.")
        options = dict(zip(_ARCHITECTURE_OPTIONS, (architecture, new_layer_prob, parameters, activation)))
        nonzero = {k: v for k, v in options.items() if v}
        if nonzero:
            raise ValueError(
                f"Mutations got {nonzero}: LLM agents only mutate RL hyper-parameters (a LoRA adapter "
                "on a frozen base has no architecture, weight-noise or activation mutation). Set "
                "architecture, new_layer_prob, parameters and activation to 0 and use rl_hp / "
                "no_mutation."
            )
        logger.debug(
            "Mutations: ignoring %s=0, activation_selection, device and accelerator (LLM agents).",
            "/".join(_ARCHITECTURE_OPTIONS),
        )
        if hp_config is not None and not isinstance(hp_config, HyperparameterConfig):
            raise ValueError(f"hp_config must be a HyperparameterConfig, got {type(hp_config).__name__}.")
        self.no_mut = float(no_mutation)
        self.rl_hp_mut = float(rl_hp)
        self.mutation_sd = float(mutation_sd)
        self.mutate_elite = bool(mutate_elite)
        self.hp_config = hp_config
        self.rng = np.random.default_rng(rand_seed)

    def _options(self, pre_training_mut: bool) -> tuple[list[str], list[float]]:
        weighted = [("none", 0.0 if pre_training_mut else self.no_mut), ("rl_hp", self.rl_hp_mut)]
        kept = [(name, w) for name, w in weighted if w > 0]
        if not kept:
            return ["none"], [1.0]
        total = sum(w for _, w in kept)
        return [name for name, _ in kept], [w / total for _, w in kept]

    def _genes(self, agent: Any) -> list[tuple[str, RLParameter]]:
        config = self.hp_config if self.hp_config is not None else getattr(agent, "hp_config", None)
        if config is not None:
            missing = [name for name in config if _get_hp(agent, name) is _MISSING]
            if missing:
                raise ValueError(
                    f"hp_config genes {missing} are not hyper-parameters of agent {agent.index} "
                    f"(agent.hps is {agent.hps!r}): fix the gene names or remove them."
                )
            genes = list(config.items())
        else:
            default = HyperparameterConfig.default()
            genes = [(name, param) for name, param in default.items() if _get_hp(agent, name) is not _MISSING]
            if not genes:
                raise ValueError(
                    f"Agent {agent.index} has none of the default genes {default.names()} "
                    f"(agent.hps is {agent.hps!r}): pass hp_config=HyperparameterConfig(...) to Mutations."
                )
        # A log-scale gene at 0 is a switched-off term (beta = 0: no KL penalty). Mutation keeps it off:
        # multiplicative noise cannot move 0, and turning a term on is the user's decision.
        live = [(name, param) for name, param in genes if not (param.log_scale and _get_hp(agent, name) <= 0)]
        if not live:
            raise ValueError(
                f"every gene of agent {agent.index} is a log-scale gene at 0 ({[n for n, _ in genes]}): nothing "
                "to mutate; give those hyper-parameters positive values or other genes"
            )
        return live

    @staticmethod
    def _is_elite(agent: Any) -> bool:
        lineage = getattr(agent, "lineage", None) or []
        return bool(lineage) and lineage[-1].get("event") == "elite"

    def mutation(
        self,
        population: list[Any],
        pre_training_mut: bool = False,
        indices: Sequence[int] | None = None,
    ) -> list[Any]:
        """Mutate a population in place and return it.

        Args:
            population: Agents to mutate.
            pre_training_mut: Mutation before training starts: ``no_mutation`` is not an option.
            indices: If given, only agents whose ``index`` is listed are candidates.

        Returns:
            The same list, its agents' hyper-parameters changed through ``set_hp``. Each agent's
            ``mut`` attribute is set to the mutated gene name or ``"None"`` (as in AgileRL).
        """
        names, proba = self._options(pre_training_mut)
        wanted = set(indices) if indices is not None else None
        targets = [a for a in population if wanted is None or a.index in wanted]
        choices = self.rng.choice(len(names), size=len(targets), p=proba) if targets else []
        for agent, choice in zip(targets, choices):
            if names[int(choice)] == "none" or (not self.mutate_elite and self._is_elite(agent)):
                agent.mut = "None"
                continue
            self._mutate_agent(agent)
        return population

    def _mutate_agent(self, agent: Any) -> None:
        genes = self._genes(agent)
        name, param = genes[int(self.rng.integers(len(genes)))]
        noise = float(self.rng.normal(0.0, self.mutation_sd))
        old = _get_hp(agent, name)
        new = mutate_value(param, old, noise)
        if new == old:
            logger.info("mutation: agent %d %s stays %r (at its bound)", agent.index, name, old)
        else:
            logger.info("mutation: agent %d %s %r -> %r", agent.index, name, old, new)
        _set_hp(agent, name, new)
        agent.lineage.append(
            {
                "step": int(agent.steps),
                "event": "mutation",
                "agent": int(agent.index),
                "hp": name,
                "old": old,
                "new": new,
            }
        )
        agent.mut = name

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for resuming (the generator state)."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Args:
            state: A dict from :meth:`state_dict`.
        """
        self.rng.bit_generator.state = state["rng"]
