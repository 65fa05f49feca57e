"""Checkpoint files of one GRPO agent: a plain PEFT adapter folder plus hyper-parameters and optimizer state.

A checkpoint folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` (loadable with
``PeftModel.from_pretrained(base, path)`` or by vLLM), ``llm_gym_agent.json`` (hyper-parameters,
fitness, steps, lineage) and ``optimizer.pt``. :class:`~llm_gym.algorithms.grpo.GRPO` calls these
functions from ``write_checkpoint`` / ``load_checkpoint``; atomicity is the caller's business
(:func:`~llm_gym.algorithms.plumbing.atomic.atomic_directory`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from llm_gym.algorithms.grpo.config import FIXED_SETTINGS

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AGENT_FILE", "OPTIMIZER_FILE", "read_agent_files", "write_agent_files"]

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's name
ADAPTER_WEIGHTS = "adapter_model.safetensors"
AGENT_FILE = "llm_gym_agent.json"
OPTIMIZER_FILE = "optimizer.pt"


def write_agent_files(agent: Any, directory: str | Path) -> None:
    """Write ``agent``'s adapter, hyper-parameters and optimizer state into an existing folder.

    Args:
        agent: A :class:`~llm_gym.algorithms.grpo.GRPO` agent.
        directory: An existing folder.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(directory)
    state = get_peft_model_state_dict(agent.model, adapter_name=agent.adapter_name)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, out / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})  # fmt: skip
    config = copy.deepcopy(agent.model.peft_config[agent.adapter_name])
    config.inference_mode = True
    if agent.model_id and not config.base_model_name_or_path:
        config.base_model_name_or_path = agent.model_id
    config.save_pretrained(str(out))
    torch.save(agent.optimizer.state_dict(), out / OPTIMIZER_FILE)
    meta = {
        "format_version": 1,
        "base_model": agent.model_id,
        "adapter_name": agent.adapter_name,
        "index": agent.index,
        "pad_token_id": agent.pad_token_id,
        "pad_token": agent.pad_token,
        "hyperparameters": dataclasses.asdict(agent.hps),
        "max_model_len": agent.max_model_len,
        "fitness": agent.fitness,
        "last_eval": dict(getattr(agent, "last_eval", {})),
        "steps": agent.steps,
        "skipped_updates": agent.skipped_updates,
        "lineage": agent.lineage,
    }
    (out / AGENT_FILE).write_text(json.dumps(meta, indent=2))


def _same(a: Any, b: Any) -> bool:
    """Equality that ignores the order of target-module lists."""
    return (set(a) if isinstance(a, (set, list)) else a) == (set(b) if isinstance(b, (set, list)) else b)


def read_agent_files(agent: Any, path: str | Path) -> None:
    """Load a folder written by :func:`write_agent_files` into ``agent``'s adapter, in place.

    Args:
        agent: A :class:`~llm_gym.algorithms.grpo.GRPO` agent with an adapter of the same shape.
        path: The checkpoint folder.

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: If the adapter's shape (rank, target modules) differs from the agent's.
    """
    from peft import PeftConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, AGENT_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: not a checkpoint written by GRPO.save_checkpoint")
    saved = PeftConfig.from_pretrained(str(path))
    mine = agent.model.peft_config[agent.adapter_name]
    for field in ("r", "target_modules", "lora_alpha"):
        a, b = getattr(saved, field, None), getattr(mine, field, None)
        if not _same(a, b):
            raise ValueError(
                f"checkpoint {path} has {field}={a!r} but this agent's adapter has {field}={b!r}; build the "
                "agent with the checkpoint's LoraConfig (PeftConfig.from_pretrained(path))"
            )
    state = load_file(str(path / ADAPTER_WEIGHTS), device=str(agent.device))
    result = set_peft_model_state_dict(agent.model, state, adapter_name=agent.adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"checkpoint {path} has tensors this adapter lacks: {result.unexpected_keys[:5]}")
    meta = json.loads((path / AGENT_FILE).read_text())
    # The agent keeps its own fixed settings (its generation engine is built around them).
    agent.hps = agent.hps.replace(**{k: v for k, v in meta["hyperparameters"].items() if k not in FIXED_SETTINGS})
    agent.fitness = [float(f) for f in meta.get("fitness", [])]
    agent.last_eval = {k: float(v) for k, v in meta.get("last_eval", {}).items()}  # a resumed run reports it
    agent.steps = int(meta.get("steps", 0))
    agent.skipped_updates = int(meta.get("skipped_updates", 0))
    agent.lineage = list(meta.get("lineage", []))
    if (path / OPTIMIZER_FILE).is_file():
        agent.optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location=agent.device))
    for group in agent.optimizer.param_groups:
        group["lr"] = agent.hps.lr
