"""Mutation: each agent either keeps its genes or has one RL hyper-parameter perturbed (AgileRL's ``Mutations``).

Genes are read and written only through the agent's ``get_hp`` / ``set_hp``
(:class:`~llm_gym.algorithms.evolution.protocol.EvolvableAgent`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llm_gym.algorithms.evolution.genes import HyperparameterConfig, RLParameter, mutate_value
from llm_gym.algorithms.evolution.protocol import EvolvableAgent

__all__ = ["Mutations"]

logger = logging.getLogger(__name__)

def _has_hp(agent: EvolvableAgent, name: str) -> bool:
    try:
        agent.get_hp(name)
    except KeyError:
        return False
    return True


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
            one, else :meth:`HyperparameterConfig.default` restricted to the genes the agent has
            (those its ``get_hp`` knows).

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
            missing = [name for name in config if not _has_hp(agent, name)]
            if missing:
                raise ValueError(
                    f"hp_config genes {missing} are not hyper-parameters of agent {agent.index} "
                    f"(agent.hps is {agent.hps!r}): fix the gene names or remove them."
                )
            genes = list(config.items())
        else:
            default = HyperparameterConfig.default()
            genes = [(name, param) for name, param in default.items() if _has_hp(agent, name)]
            if not genes:
                raise ValueError(
                    f"Agent {agent.index} has none of the default genes {default.names()} "
                    f"(agent.hps is {agent.hps!r}): pass hp_config=HyperparameterConfig(...) to Mutations."
                )
        # A log-scale gene at 0 is a switched-off term (beta = 0: no KL penalty). Mutation keeps it off:
        # multiplicative noise cannot move 0, and turning a term on is the user's decision.
        live = [(name, param) for name, param in genes if not (param.log_scale and agent.get_hp(name) <= 0)]
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
        old = agent.get_hp(name)
        new = mutate_value(param, old, noise)
        if new == old:
            logger.info("mutation: agent %d %s stays %r (at its bound)", agent.index, name, old)
        else:
            logger.info("mutation: agent %d %s %r -> %r", agent.index, name, old, new)
        agent.set_hp(name, new)
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
