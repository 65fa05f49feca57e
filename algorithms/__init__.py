"""Training algorithms for llm-gym: GRPO agents with LoRA, their rollouts, evolution and the training run.

The folders are the architecture; dependencies point one way,
``recipe -> run -> {grpo, evolution} -> rollout -> plumbing`` (evolution imports none of them)::

    grpo/        the agent
      config.py      GRPOConfig: every setting of an agent, frozen and validated
      agent.py       GRPO: wires model, backend, optimizer, update; get_hp/set_hp, clone, release
      model.py       loading the policy, PEFT adapters on one shared base, device, pad id
      update.py      learn(): plan -> frozen log-probs -> accumulated epochs -> metrics
      loss.py        advantages, LOSS_VARIANTS (surrogate + normaliser + batch share), grpo_loss
      logps.py       completion log-probs (prompt forward shared by its group), chunked log-softmax
      checkpoint.py  an agent's files: PEFT adapter, llm_gym_agent.json, optimizer.pt
      population.py  create_population: N agents on one base; population_fitness: batched held-out eval
    rollout/     prompts -> scored completions
      rollout.py     Rollout, rollout() and evaluate(): one path for training, fitness and llm-gym eval
      multi_turn.py  MultiTurnEnv protocol, the batched generate -> env step turn loop, play_held_out
      game_eval.py   llm-gym eval of a multi-turn env (its oracle, a model or an elite)
      backend.py     GenerationBackend protocol, SamplingConfig, BACKENDS by name, make_backend
      hf.py, vllm.py the "hf" (training model, CPU default) and "vllm" backends
      vllm_server.py the "vllm-server" backend (a `vllm serve` over HTTP, LoRA adapters loaded by name)
      decoding.py    the lean decoding loop of the HF backend
      population.py, population_decode.py  a population's generation / fitness in one decode (per-row LoRA)
      completions.py padding, per-prompt completions, packing into mini-batches
      policies.py    OraclePolicy, ModelPolicy (policies that are not agents)
    evolution/   genes.py (RLParameter, HyperparameterConfig), selection.py (TournamentSelection),
                 mutation.py (Mutations), lineage.py, protocol.py (EvolvableAgent)
    run/         loop.py (finetune_llm_reasoning), checkpoints.py (whole-run checkpoints, RNG),
                 elites.py (EliteStore, load_elite), loggers.py (CSV/TensorBoard/W&B), plots.py
    plumbing/    no concept of its own: kv_cache.py, lora_swap.py (faster decoding and update),
                 cpu_allocator.py, atomic.py (crash-safe writes)
    sft.py       SFT warm-up on oracle solutions, filtered rollouts or whole multi-turn games
    recipe.py    the main job (llm-gym train): tiny model -> SFT -> population GRPO -> held-out table

Imports here are lazy so ``import llm_gym.algorithms`` stays light (no torch, transformers or peft
until a name is used); vLLM is imported only by ``GRPO(use_vllm=True)`` / ``backend="vllm"``. The
rollout function is ``llm_gym.algorithms.rollout.rollout.rollout`` (here ``rollout`` is the subpackage).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BACKENDS",
    "EnvTurn",
    "GRPO",
    "GRPOConfig",
    "GRPOHyperParams",
    "GenerationBackend",
    "HFGenerationBackend",
    "HyperparameterConfig",
    "LOSS_TYPES",
    "LOSS_VARIANTS",
    "MultiTurnEnv",
    "Mutations",
    "RLParameter",
    "Rollout",
    "SamplingConfig",
    "TournamentSelection",
    "VLLMConfig",
    "VLLMServerConfig",
    "create_population",
    "evaluate",
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
    "LOSS_TYPES": "grpo.loss",
    "LOSS_VARIANTS": "grpo.loss",
    "group_advantages": "grpo.loss",
    "grpo_loss": "grpo.loss",
    "selective_log_softmax": "grpo.logps",
    "token_entropy": "grpo.logps",
    "create_population": "grpo.population",
    "BACKENDS": "rollout.backend",
    "GenerationBackend": "rollout.backend",
    "SamplingConfig": "rollout.backend",
    "HFGenerationBackend": "rollout.hf",
    "VLLMConfig": "rollout.vllm",
    "VLLMServerConfig": "rollout.vllm_server",
    "Rollout": "rollout.rollout",
    "evaluate": "rollout.rollout",
    "EnvTurn": "rollout.multi_turn",
    "MultiTurnEnv": "rollout.multi_turn",
    "HyperparameterConfig": "evolution.genes",
    "RLParameter": "evolution.genes",
    "Mutations": "evolution.mutation",
    "TournamentSelection": "evolution.selection",
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
