"""Populations of GRPO agents on one shared base model, and whole-population checkpoints.

Every agent of a population is a LoRA adapter of the SAME PEFT model (``peft_model.add_adapter``):
the base weights are held once, whatever the population size. An agent's clone copies adapter
tensors and optimizer state only.

A population checkpoint is one folder written atomically (temporary sibling, then rename), so a
run killed at any moment, even mid-write, leaves the previous complete checkpoint::

    <checkpoint_path>/latest/
        state.json          step, data position, selection/mutation RNGs, global RNGs, fitness log
        agent_0/ ...        each agent's PEFT adapter, hyper-parameters, optimizer state
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llm_gym.algorithms.plumbing.atomic import (
    atomic_directory,
    capture_rng_state,
    recover_directory,
    restore_rng_state,
)

__all__ = ["create_population", "copy_adapter", "save_population", "load_population", "STATE_FILE"]

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"


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


def save_population(
    path: str | Path,
    population: Sequence[Any],
    *,
    step: int,
    env: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the whole population and the run state atomically into ``path``.

    Args:
        path: The checkpoint folder (replaced as a whole).
        population: The agents (each with ``write_checkpoint(dir)``).
        step: Training steps done.
        env: The environment; its ``state_dict()`` (data position, epoch) is saved when it has one.
        extra: More JSON-able run state (selection/mutation state, fitness records, ...).

    Returns:
        The checkpoint folder.
    """
    path = Path(path)
    state: dict[str, Any] = {
        "format_version": 1,
        "step": int(step),
        "agents": [{"slot": i, "index": int(a.index), "dir": f"agent_{i}"} for i, a in enumerate(population)],
        "env": env.state_dict() if env is not None and hasattr(env, "state_dict") else None,
        "rng": capture_rng_state(),
        **(dict(extra) if extra else {}),
    }
    with atomic_directory(path) as tmp:
        for i, agent in enumerate(population):
            (tmp / f"agent_{i}").mkdir()
            agent.write_checkpoint(tmp / f"agent_{i}")
        (tmp / STATE_FILE).write_text(json.dumps(state))
    logger.info("saved population checkpoint %s (step %d)", path, step)
    return path


def load_population(path: str | Path, population: Sequence[Any], *, env: Any = None) -> dict[str, Any]:
    """Restore a checkpoint of :func:`save_population` into an existing population of the same size.

    Each agent's adapter, optimizer state, hyper-parameters, fitness and lineage are loaded; the
    env's data position and the global RNG states are restored.

    Args:
        path: The checkpoint folder.
        population: Agents built the same way as the run that saved it (same base and LoRA config).
        env: The environment, restored through ``load_state_dict`` when given.

    Returns:
        The saved run state (``step`` and any ``extra`` given to :func:`save_population`).

    Raises:
        FileNotFoundError: if there is no complete checkpoint at ``path``.
        ValueError: if the population size differs from the checkpoint's.
    """
    path = Path(path)
    recover_directory(path)  # a write killed between its two renames leaves the old copy aside
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"no population checkpoint at {path} ({STATE_FILE} is missing)")
    state = json.loads(state_file.read_text())
    saved = state["agents"]
    if len(saved) != len(population):
        raise ValueError(
            f"checkpoint {path} holds {len(saved)} agents but the population has {len(population)}: "
            "build the same population size to resume"
        )
    for entry, agent in zip(saved, population, strict=True):
        agent.load_checkpoint(path / entry["dir"])
        agent.index = int(entry["index"])
    if env is not None and state.get("env") is not None:
        env.load_state_dict(state["env"])
    restore_rng_state(state["rng"])
    logger.info("resumed population of %d from %s at step %d", len(population), path, state["step"])
    return state
