"""Settings and construction of the colocated vLLM engine (used by :mod:`~llm_gym.algorithms.rollout.vllm`).

What vLLM would reject late, or silently run differently, is checked here when the agent is built:
the sleep level, the LoRA rank and ``LoraConfig`` features, the context and batch-token budgets.
The engine runs in this process by default (``distributed_executor_backend="external_launcher"``
with ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` set): no child process re-runs the user's script and,
under accelerate, each rank's engine sits on that rank's GPU. With vLLM's own engine process a
script without ``if __name__ == "__main__":`` is detected and named.

Imports without vLLM.
"""

from __future__ import annotations

import ast
import importlib
import logging
import multiprocessing
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "LORA_RANKS",
    "VLLMConfig",
    "check_engine_process",
    "check_lora_config",
    "engine_kwargs",
    "executor_for",
    "import_vllm",
    "lora_rank_for",
    "process_ranks",
    "set_launcher_env",
]

logger = logging.getLogger(__name__)

VLLM_MISSING = (
    'use_vllm=True needs vLLM, which is not installed: pip install "llm-gym[vllm]" on a machine with a CUDA '
    "GPU (vLLM wheels are CUDA-only), or set use_vllm=False to generate with transformers"
)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks
EXECUTORS = ("auto", "external_launcher", None, "mp", "ray", "uni")
SPAWN_FIX = (
    'put the training code under `if __name__ == "__main__":`, or keep the engine in this process with '
    'VLLMConfig(distributed_executor_backend="external_launcher") (the default when tensor_parallel_size=1)'
)


@dataclass(frozen=True)
class VLLMConfig:
    """Settings of the colocated vLLM engine (AgileRL's ``VLLMConfig`` names, plus vLLM's own).

    Attributes:
        sleep_mode: Release the engine's GPU memory while the trainer learns (``llm.sleep(level=1)``).
        max_num_seqs: Most sequences the engine decodes at once.
        gpu_memory_utilization: Share of GPU memory the engine may take (the trainer needs the rest).
        tensor_parallel_size: GPUs the engine shards the model over.
        max_num_batched_tokens: Token budget of one engine step; None: ``max(4096, max_model_len)``
            (vLLM's larger default misleads its memory profiler, TRL uses 4096).
        max_lora_rank: Largest LoRA rank served, one of :data:`LORA_RANKS`; None: the smallest >= the
            agents' ``r`` (a larger one allocates LoRA memory for nothing).
        max_loras: Adapters on the GPU in one engine step (a population generating in one call
            runs fastest with one per agent).
        max_cpu_loras: Adapters cached in CPU memory; None: ``max(max_loras, 8, population_size)``.
            A value below ``population_size`` is refused: every switch between agents would re-read
            an adapter from disk.
        population_size: Agents sharing this engine (clones of the agent that builds it);
            :func:`~llm_gym.algorithms.grpo.population.create_population` sets it.
        enforce_eager: Skip CUDA-graph capture (graphs stay resident through sleep; True when colocated).
        sleep_level: Must be 1 (weights kept in CPU memory). Level 2 discards the base weights,
            which the LoRA-only sync never reloads.
        max_prompt_len: Prompt tokens budgeted when the agent has no ``max_model_len``: the engine's
            context is then ``max_prompt_len + max_output_tokens`` (capped by the model's).
        distributed_executor_backend: ``"auto"``: ``"external_launcher"`` (in-process engine) when
            ``tensor_parallel_size == 1``, else vLLM's own engine process; or any vLLM value (None
            for vLLM's default).
        logprobs: Also return the sampled tokens' log-probs (``last_logprobs``, vLLM's
            ``processed_logprobs``: after temperature, top-k and top-p) for the importance-sampling
            correction (``GRPOConfig.vllm_importance_sampling_correction`` turns it on).
    """

    sleep_mode: bool = False
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    max_num_batched_tokens: int | None = None
    max_lora_rank: int | None = None
    max_loras: int = 1
    max_cpu_loras: int | None = None
    population_size: int = 1
    enforce_eager: bool = True
    sleep_level: int = 1
    max_prompt_len: int = 1024
    distributed_executor_backend: str | None = "auto"
    logprobs: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]; the trainer shares the GPU, "
                "so 0.2-0.5 is typical"
            )
        for name in ("max_num_seqs", "tensor_parallel_size", "max_loras", "max_prompt_len", "population_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.sleep_level != 1:
            raise ValueError(
                f"sleep_level={self.sleep_level} is not supported: LoRA-only sync needs level 1. Level 2 discards "
                "the base weights and a plain wake_up() brings back garbage (vLLM #29341, #39934); use sleep_level=1"
            )
        if self.max_lora_rank is not None and self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank={self.max_lora_rank} must be one of vLLM's {LORA_RANKS} (or None)")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras={self.max_cpu_loras} must be >= max_loras={self.max_loras}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.population_size:
            raise ValueError(f"max_cpu_loras={self.max_cpu_loras} is below the population size {self.population_size}: "
                             f"set VLLMConfig(max_cpu_loras>={self.population_size}), or None to size it from the "
                             "population")  # fmt: skip
        if self.distributed_executor_backend not in EXECUTORS:
            raise ValueError(f"distributed_executor_backend={self.distributed_executor_backend!r} must be one of "
                             f"{EXECUTORS}")  # fmt: skip
        if self.distributed_executor_backend == "external_launcher" and self.tensor_parallel_size > 1:
            raise ValueError(
                "the in-process engine (external_launcher) serves one GPU per rank here: use tensor_parallel_size=1, "
                "or distributed_executor_backend=None for a tensor-parallel engine in its own process"
            )


def import_vllm() -> Any:
    """Import ``vllm``, or fail with how to install it.

    Returns:
        The ``vllm`` module.

    Raises:
        ImportError: If vLLM is not installed.
    """
    try:
        return importlib.import_module("vllm")
    except ImportError as err:
        raise ImportError(VLLM_MISSING) from err


def lora_rank_for(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that serves rank ``rank``.

    Args:
        rank: The adapters' LoRA rank ``r``.

    Returns:
        A value of :data:`LORA_RANKS`.

    Raises:
        ValueError: If ``rank`` exceeds vLLM's largest.
    """
    for allowed in LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"LoRA rank r={rank} exceeds vLLM's largest max_lora_rank {LORA_RANKS[-1]}; use r <= 512")


def check_lora_config(config: Any, max_lora_rank: int | None = None) -> None:
    """Refuse a ``peft.LoraConfig`` vLLM would reject (or serve differently) at its first generation.

    Args:
        config: The adapter's ``LoraConfig``.
        max_lora_rank: The engine's largest rank, if known.

    Raises:
        ValueError: On ``modules_to_save``, DoRA, a bias, per-module rank/alpha patterns or a rank above
            ``max_lora_rank``.
    """
    problems = []
    if getattr(config, "modules_to_save", None):
        problems.append(f"modules_to_save={sorted(config.modules_to_save)} (vLLM serves LoRA weights only)")
    if getattr(config, "use_dora", False):
        problems.append("use_dora=True (vLLM does not support DoRA)")
    bias = getattr(config, "bias", "none")
    if bias != "none" or getattr(config, "lora_bias", False):
        problems.append(f"bias={bias!r} / lora_bias (vLLM does not load adapter biases)")
    for name in ("rank_pattern", "alpha_pattern"):
        if getattr(config, name, None):
            problems.append(f"{name} (vLLM scales every module by lora_alpha / r)")
    if max_lora_rank is not None and config.r > max_lora_rank:
        problems.append(f"r={config.r} > VLLMConfig.max_lora_rank={max_lora_rank}")
    if problems:
        raise ValueError("the vLLM backend cannot serve this LoraConfig: " + "; ".join(problems) + ". Fix the "
                         "LoraConfig, or use use_vllm=False")  # fmt: skip


def _is_main_guard(test: ast.expr) -> bool:
    if not isinstance(test, ast.Compare) or len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and any(
        isinstance(s, ast.Constant) and s.value == "__main__" for s in sides
    )


def _unguarded_main_script() -> str | None:
    """The running script's path if it has no top-level ``if __name__ == "__main__":``, else None."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path or not str(path).endswith(".py"):
        return None  # interactive, a notebook or python -c: spawn does not re-run a script
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    return None if any(isinstance(n, ast.If) and _is_main_guard(n.test) for n in tree.body) else str(path)


def check_engine_process(executor: str | None) -> None:
    """Fail or warn where vLLM's engine child process would re-run an unguarded user script.

    vLLM starts its engine in a child process (``spawn`` once CUDA is initialised) unless it runs
    in-process; the child re-imports the main script.

    Args:
        executor: The ``distributed_executor_backend`` the engine is built with.

    Raises:
        RuntimeError: When called while this process is itself such a child re-running the script.
    """
    if executor == "external_launcher" or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        return  # the engine runs in this process
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            "this script is being re-run by the child process vLLM starts for its engine (it has no "
            f'`if __name__ == "__main__":` guard), which fails in multiprocessing\'s bootstrapping phase: {SPAWN_FIX}'
        )
    script = _unguarded_main_script()
    if script is not None:
        logger.warning(
            'vLLM will start its engine in a child process with the "spawn" method (CUDA is initialised), which '
            "re-runs %s; it has no `if __name__ == \"__main__\":` guard, so the child would fail with \"An attempt "
            'has been made to start a new process before the current process has finished its bootstrapping '
            'phase\": %s', script, SPAWN_FIX,
        )  # fmt: skip


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def executor_for(config: VLLMConfig) -> str | None:
    """vLLM's ``distributed_executor_backend`` for this config.

    Args:
        config: Engine settings.

    Returns:
        ``"auto"`` resolved: ``"external_launcher"`` for one GPU per engine, else None (vLLM's default).
    """
    if config.distributed_executor_backend == "auto":
        return "external_launcher" if config.tensor_parallel_size == 1 else None
    return config.distributed_executor_backend


def process_ranks(agent: Any) -> tuple[int, int, int]:
    """This process's place among the training processes.

    Args:
        agent: The agent (its ``accelerator``, if any).

    Returns:
        ``(rank, local_rank, world_size)``: the accelerator's, else the launcher's environment
        (``RANK``/``LOCAL_RANK``/``WORLD_SIZE``), else one process.
    """
    acc = agent.accelerator
    if acc is not None and hasattr(acc, "process_index"):
        return int(acc.process_index), int(acc.local_process_index), int(acc.num_processes)
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def set_launcher_env(agent: Any) -> None:
    """Set ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` and a rendezvous address for the in-process engine.

    vLLM's ``external_launcher`` executor reads them (as under ``torchrun``) and puts the engine on
    ``cuda:LOCAL_RANK``; ``MASTER_ADDR``/``MASTER_PORT`` are only filled in when missing.

    Args:
        agent: The agent (its ``accelerator`` and ``device``).
    """
    rank, local, world = process_ranks(agent)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    device = torch.device(agent.device)
    if device.type == "cuda" and device.index is not None and device.index != local:
        logger.warning("the trainer is on %s but the in-process vLLM engine takes cuda:%d (LOCAL_RANK)", device, local)


def engine_kwargs(agent: Any, config: VLLMConfig) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for this agent, with every limit resolved at construction.

    Args:
        agent: The GRPO agent (model id and dtype, LoRA rank, ``max_model_len``, ``max_output_tokens``,
            seed, accelerator).
        config: Engine settings.

    Returns:
        The keyword arguments.

    Raises:
        ValueError: If the LoRA rank exceeds vLLM's largest.
    """
    r = agent.model.peft_config[agent.adapter_name].r
    max_rank = config.max_lora_rank if config.max_lora_rank is not None else lora_rank_for(r)
    max_len = agent.max_model_len
    if max_len is None:
        limit = getattr(agent.model.config, "max_position_embeddings", None)
        max_len = config.max_prompt_len + agent.hps.max_output_tokens
        max_len = min(max_len, int(limit)) if limit else max_len
        logger.info("vLLM max_model_len=%d (max_prompt_len + max_output_tokens); set GRPO(max_model_len=...) to "
                    "change it", max_len)  # fmt: skip
    kwargs: dict[str, Any] = {
        "model": agent.model_id,
        "enable_lora": True,
        "max_lora_rank": max_rank,
        "max_loras": config.max_loras,
        "max_cpu_loras": config.max_cpu_loras or max(config.max_loras, 8, config.population_size),
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "tensor_parallel_size": config.tensor_parallel_size,
        "max_num_seqs": config.max_num_seqs,
        "max_model_len": max_len,
        "max_num_batched_tokens": config.max_num_batched_tokens or max(4096, max_len),
        "enable_sleep_mode": config.sleep_mode,
        "enforce_eager": config.enforce_eager,
        "dtype": str(next(agent.model.parameters()).dtype).replace("torch.", ""),
    }
    executor = executor_for(config)
    rank, _, world = process_ranks(agent)
    if executor is not None:
        kwargs["distributed_executor_backend"] = executor
    if executor == "external_launcher" and (agent.seed is not None or world > 1):
        kwargs["seed"] = (agent.seed or 0) + rank  # ranks sample differently, reproducibly
    elif agent.seed is not None:
        kwargs["seed"] = agent.seed
    if config.logprobs:
        # the distribution sampled from (after temperature, top-k, top-p): the trainer scores the tokens at the
        # agent's temperature too (update.policy_logps), so the two agree up to kernel drift (and top-k/top-p)
        kwargs["logprobs_mode"] = "processed_logprobs"
    return kwargs
