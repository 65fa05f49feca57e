"""Populations of GRPO agents on one shared base model.

Every agent of a population is a LoRA adapter of the SAME PEFT model (``peft_model.add_adapter``):
the base weights are held once, whatever the population size. An agent's clone copies adapter
tensors and optimizer state only (:func:`~llm_gym.algorithms.grpo.model.copy_adapter`). Saving and restoring a whole population is
the run's business (:mod:`llm_gym.algorithms.run.checkpoints`).
"""

from __future__ import annotations

from typing import Any

from llm_gym.algorithms.grpo.agent import GRPO

__all__ = ["create_population"]


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
    first = GRPO(**{**grpo_kwargs, "adapter_name": "agent0", "index": 0})
    return [first] + [first.clone(index=i, adapter_name=f"agent{i}") for i in range(1, size)]
