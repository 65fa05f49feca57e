"""Whole-run checkpoints: every agent of a population, the run state and the RNG states, in one atomic folder.

A run killed at any moment, even mid-write, leaves the previous complete checkpoint
(:func:`~llm_gym.algorithms.plumbing.atomic.atomic_directory`)::

    <checkpoint_path>/latest/
        state.json          step, data position, selection/mutation RNGs, global RNGs, fitness log
        agent_0/ ...        each agent's PEFT adapter, tokenizer, hyper-parameters, optimizer state

Agents are duck-typed: anything with ``write_checkpoint(dir)``, ``load_checkpoint(dir)`` and ``index``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm_gym.algorithms.plumbing.atomic import atomic_directory, recover_directory

__all__ = [
    "STATE_FILE", "capture_rng_state", "load_population", "restore_rng_state", "save_population", "write_with_tokenizer",
]

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"


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
            write_with_tokenizer(agent, env, tmp / f"agent_{i}")
        (tmp / STATE_FILE).write_text(json.dumps(state))
    logger.info("saved population checkpoint %s (step %d)", path, step)
    return path


def write_with_tokenizer(agent: Any, env: Any, directory: Path) -> None:
    """``agent.write_checkpoint(directory)``, plus the env's tokenizer when it has one.

    With the tokenizer beside the adapter, the folder loads on its own
    (``AutoPeftModelForCausalLM.from_pretrained(folder)`` + ``AutoTokenizer.from_pretrained(folder)``,
    or ``llm-gym eval --model folder``).

    Args:
        agent: Anything with ``write_checkpoint(dir)``.
        env: The environment (its ``tokenizer`` attribute is saved when present), or None.
        directory: An existing folder.
    """
    agent.write_checkpoint(directory)
    tokenizer = getattr(env, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))


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


def capture_rng_state() -> dict[str, Any]:
    """Capture the global RNG states of python ``random``, numpy and torch (CPU and every CUDA device).

    Returns:
        A JSON-serialisable dict (lists of ints): ``{"python": ..., "numpy": ..., "torch": ...,
        "torch_cuda": [...]}``; the torch keys are absent when torch is not installed.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    try:
        import torch
    except ImportError:  # torch is optional for this module
        return state
    state["torch"] = torch.get_rng_state().tolist()
    if torch.cuda.is_available():
        state["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states :func:`capture_rng_state` returned.

    Args:
        state: The captured dict (possibly after a JSON round trip).

    Raises:
        ValueError: If the CUDA state was captured with a different number of devices.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" not in state:
        return
    import torch

    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda_states = state.get("torch_cuda")
    if cuda_states is not None and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(
                f"RNG state holds {len(cuda_states)} CUDA device states but {torch.cuda.device_count()} "
                "devices are visible: resume with the same CUDA_VISIBLE_DEVICES."
            )
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda_states])
