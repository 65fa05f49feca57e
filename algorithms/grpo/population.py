"""Populations of GRPO agents on one shared base model.

Every agent of a population is a LoRA adapter of the SAME PEFT model (``peft_model.add_adapter``):
the base weights are held once, whatever the population size. An agent's clone copies adapter
tensors and optimizer state only (:func:`~llm_gym.algorithms.grpo.model.copy_adapter`). Saving and restoring a whole population is
the run's business (:mod:`llm_gym.algorithms.run.checkpoints`). Generation and held-out evaluation of the
whole population run as one batched decode (:mod:`~llm_gym.algorithms.rollout.population`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from llm_gym.algorithms.evolution.fitness import fitness_of
from llm_gym.algorithms.grpo.agent import GRPO
from llm_gym.algorithms.rollout.population import batched_population, evaluate_population
from llm_gym.algorithms.rollout.vllm_engine import VLLMConfig

__all__ = ["create_population", "population_fitness"]


def create_population(size: int, **grpo_kwargs: Any) -> list[GRPO]:
    """``size`` GRPO agents sharing one base model, each with its own adapter and optimizer.

    The first agent loads (or wraps) the model; the others are clones of it, so all start from
    the same adapter initialisation and the same hyper-parameters. Give them different
    hyper-parameters afterwards with ``agent.set_hp`` (or let
    :class:`~llm_gym.algorithms.evolution.mutation.Mutations` do it with
    ``pre_training_mut=True``).

    Args:
        size: Number of agents (>= 1).
        **grpo_kwargs: Arguments of :class:`~llm_gym.algorithms.grpo.agent.GRPO` (``model_name`` or
            ``actor_network``, ``pad_token_id``, ``lora_config``, ...).

    Returns:
        The agents, with ``index`` 0..size-1 and adapters ``agent0``..``agent{size-1}``.

    Raises:
        ValueError: if ``size < 1``.
    """
    if size < 1:
        raise ValueError(f"a population needs at least one agent, got size={size}")
    first = GRPO(**{**_sized_engine(size, grpo_kwargs), "adapter_name": "agent0", "index": 0})
    return [first] + [first.clone(index=i, adapter_name=f"agent{i}") for i in range(1, size)]


def population_fitness(
    pop: Sequence[Any], env: Any, max_problems: int | None = None, *, split: str = "test", fitness: str = "reward"
) -> list[float]:
    """Every agent's :meth:`GRPO.test <llm_gym.algorithms.grpo.agent.GRPO.test>`, with each batch of
    problems decoded for all agents at once (:func:`~llm_gym.algorithms.rollout.population.evaluate_population`).

    Sets each agent's ``last_eval`` and appends to its ``fitness``, as ``test`` does; agents that
    cannot be batched (:func:`~llm_gym.algorithms.rollout.population.batched_population`) run their own ``test``.

    Args:
        pop: The agents.
        env: As in ``GRPO.test``.
        max_problems: As in ``GRPO.test``.
        split: As in ``GRPO.test``.
        fitness: As in ``GRPO.test``.

    Returns:
        The fitness of each agent, in order.
    """
    if not batched_population(pop):
        return [agent.test(env, max_problems=max_problems, split=split, fitness=fitness) for agent in pop]
    max_total = getattr(getattr(env, "rubric", None), "max_total", None)
    scores = []
    for agent, metrics in zip(pop, evaluate_population(pop, env, max_problems, split=split), strict=True):
        agent.last_eval = metrics
        agent.fitness.append(fitness_of(metrics, fitness, max_total))
        scores.append(agent.fitness[-1])
    return scores


def _sized_engine(size: int, grpo_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``grpo_kwargs`` with the vLLM engine (shared by every clone) sized for ``size`` agents.

    vLLM fixes ``max_cpu_loras`` when the engine is built, by the first agent, before its clones
    exist: ``VLLMConfig.population_size`` tells it how many adapters it will serve.

    Raises:
        ValueError: If the user's ``max_cpu_loras`` is below ``size``.
    """
    config = grpo_kwargs.get("config")
    uses_vllm = (grpo_kwargs.get("use_vllm") or grpo_kwargs.get("backend", getattr(config, "backend", None)) == "vllm")
    if not uses_vllm:
        return grpo_kwargs
    key = "backend_config" if grpo_kwargs.get("backend_config") is not None else "vllm_config"
    engine = grpo_kwargs.get(key)
    if engine is None:
        engine = VLLMConfig()
    if not isinstance(engine, VLLMConfig):
        return grpo_kwargs  # the backend reports what it makes of a foreign config
    return {**grpo_kwargs, key: dataclasses.replace(engine, population_size=max(size, engine.population_size))}
