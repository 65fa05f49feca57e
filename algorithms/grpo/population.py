"""Populations of GRPO agents on one shared base model.

Every agent of a population is a LoRA adapter of the SAME PEFT model (``peft_model.add_adapter``):
the base weights are held once, whatever the population size. An agent's clone copies adapter
tensors and optimizer state only (:func:`copy_adapter`). Saving and restoring a whole population is
the run's business (:mod:`llm_gym.algorithms.run.checkpoints`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["copy_adapter", "create_population"]


def copy_adapter(model: Any, source: str, target: str | None = None) -> str:
    """Add a copy of adapter ``source`` to the PEFT ``model`` (same config, cloned tensors).

    Args:
        model: A ``PeftModel``.
        source: Name of the adapter to copy.
        target: Name of the new adapter; default ``"<source>_clone<k>"`` with the first free ``k``.

    Returns:
        The new adapter's name.

    Raises:
        ValueError: If ``target`` is already taken.
    """
    import copy

    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    if target is None:
        k = 1
        while f"{source}_clone{k}" in model.peft_config:
            k += 1
        target = f"{source}_clone{k}"
    if target in model.peft_config:
        raise ValueError(f"adapter name {target!r} is already used in this model; pick another")
    model.add_adapter(target, copy.deepcopy(model.peft_config[source]))
    state = get_peft_model_state_dict(model, adapter_name=source)
    set_peft_model_state_dict(model, {k: v.clone() for k, v in state.items()}, adapter_name=target)
    return target


def create_population(size: int, **grpo_kwargs: Any) -> list[Any]:
    """``size`` GRPO agents sharing one base model, each with its own adapter and optimizer.

    The first agent loads (or wraps) the model; the others are clones of it, so all start from
    the same adapter initialisation and the same hyper-parameters. Give them different
    hyper-parameters afterwards with ``agent.set_hp`` (or let :class:`Mutations` do it with
    ``pre_training_mut=True``).

    Args:
        size: Number of agents (>= 1).
        **grpo_kwargs: Arguments of :class:`~llm_gym.algorithms.grpo.GRPO` (``model_name`` or
            ``actor_network``, ``pad_token_id``, ``lora_config``, ...).

    Returns:
        The agents, with ``index`` 0..size-1 and adapters ``agent0``..``agent{size-1}``.

    Raises:
        ValueError: if ``size < 1``.
    """
    from llm_gym.algorithms.grpo.agent import GRPO

    if size < 1:
        raise ValueError(f"a population needs at least one agent, got size={size}")
    first = GRPO(**{**grpo_kwargs, "adapter_name": "agent0", "index": 0})
    return [first] + [first.clone(index=i, adapter_name=f"agent{i}") for i in range(1, size)]
