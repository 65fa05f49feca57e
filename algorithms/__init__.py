"""Training algorithms for llm-gym: GRPO with LoRA, its losses and generation backends.

Imports are lazy so ``import llm_gym.algorithms`` stays light (no torch, transformers or peft until a
name is used); vLLM is imported only by ``GRPO(use_vllm=True)``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "GRPO",
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
    "GRPO": "grpo",
    "GRPOHyperParams": "grpo",
    "GenerationBackend": "generation",
    "HFGenerationBackend": "generation",
    "SamplingConfig": "generation",
    "VLLMConfig": "vllm_backend",
    "LOSS_TYPES": "loss",
    "group_advantages": "loss",
    "grpo_loss": "loss",
    "selective_log_softmax": "loss",
    "token_entropy": "loss",
    "HyperparameterConfig": "evolution",
    "Mutations": "evolution",
    "RLParameter": "evolution",
    "TournamentSelection": "evolution",
    "create_population": "population",
    "finetune_llm_reasoning": "training",
    "load_elite": "elites",
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
