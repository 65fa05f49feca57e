"""Training algorithms for llm-gym: GRPO with LoRA, its losses and generation backends.

Imports are lazy so ``import llm_gym.algorithms`` stays light (no torch, transformers or peft until a
name is used); vLLM is imported only by ``GRPO(use_vllm=True)``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "GRPO",
    "GRPOConfig",
    "GRPOHyperParams",
    "GenerationBackend",
    "HFGenerationBackend",
    "HyperparameterConfig",
    "LOSS_TYPES",
    "Mutations",
    "RLParameter",
    "SamplingConfig",
    "TournamentSelection",
    "VLLMConfig",
    "create_population",
    "finetune_llm_reasoning",
    "group_advantages",
    "grpo_loss",
    "load_elite",
    "selective_log_softmax",
    "token_entropy",
]

_WHERE = {
    "GRPO": "grpo.agent",
    "GRPOConfig": "grpo.config",
    "GRPOHyperParams": "grpo.config",
    "GenerationBackend": "rollout.backend",
    "HFGenerationBackend": "rollout.hf",
    "SamplingConfig": "rollout.backend",
    "VLLMConfig": "rollout.vllm",
    "LOSS_TYPES": "grpo.loss",
    "group_advantages": "grpo.loss",
    "grpo_loss": "grpo.loss",
    "selective_log_softmax": "grpo.logps",
    "token_entropy": "grpo.logps",
    "HyperparameterConfig": "evolution.genes",
    "Mutations": "evolution.mutation",
    "RLParameter": "evolution.genes",
    "TournamentSelection": "evolution.selection",
    "create_population": "grpo.population",
    "finetune_llm_reasoning": "run.loop",
    "load_elite": "run.elites",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'llm_gym.algorithms' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"llm_gym.algorithms.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
