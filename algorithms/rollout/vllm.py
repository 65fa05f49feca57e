"""vLLM generation backend: a colocated engine serving the agents' LoRA adapters.

One ``vllm.LLM`` holds the base model on the same GPU as the trainer (``enable_lora=True``). After
every update the agent's adapter is saved to a temporary folder and served through a fresh
``LoRARequest`` (vLLM caches adapters by their integer id, so a new id is what makes it reload),
so only the LoRA weights move, never the base. With ``sleep_mode`` the engine's weights and KV
cache are released while the trainer runs (``llm.sleep()``) and restored before generating
(``llm.wake_up()``). A population shares one engine: each agent generates with its own adapter.

``vllm`` is imported only when this backend is built (``GRPO(use_vllm=True)``); this module itself,
and :class:`VLLMConfig`, import without it.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_gym.algorithms.rollout.backend import GenerationOutput, SamplingConfig
from llm_gym.algorithms.rollout.completions import left_pad, split_completions

__all__ = ["VLLMBackend", "VLLMConfig", "build_vllm_backend", "import_vllm", "sampling_params_kwargs"]

logger = logging.getLogger(__name__)

VLLM_MISSING = (
    'use_vllm=True needs vLLM, which is not installed: pip install "llm-gym[vllm]" on a machine with a CUDA '
    "GPU (vLLM wheels are CUDA-only), or set use_vllm=False to generate with transformers"
)


@dataclass(frozen=True)
class VLLMConfig:
    """Settings of the colocated vLLM engine (AgileRL's ``VLLMConfig`` names).

    Attributes:
        sleep_mode: Release the engine's GPU memory while training (``llm.sleep()``), wake it to generate.
        max_num_seqs: Most sequences the engine decodes at once.
        gpu_memory_utilization: Share of GPU memory the engine may take (the trainer needs the rest).
        tensor_parallel_size: GPUs the engine shards the model over.
        max_num_batched_tokens: Token budget of one engine step (None: vLLM's default).
        max_lora_rank: Largest LoRA rank served (must be >= the agents' ``r``).
        max_loras: Adapters held on the GPU at once (one per population member generating).
        enforce_eager: Skip CUDA-graph capture (slower decoding, faster start, less memory).
        sleep_level: 1 offloads weights to CPU; 2 discards them (the LoRA-only sync makes 1 the safe choice).
    """

    sleep_mode: bool = False
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    max_num_batched_tokens: int | None = None
    max_lora_rank: int = 64
    max_loras: int = 1
    enforce_eager: bool = False
    sleep_level: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]; the trainer shares the GPU, "
                "so 0.2-0.5 is typical"
            )
        for name in ("max_num_seqs", "tensor_parallel_size", "max_lora_rank", "max_loras"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"sleep_level={self.sleep_level} must be 1 or 2")


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


def sampling_params_kwargs(sampling: SamplingConfig, eos_token_ids: Sequence[int]) -> dict[str, Any]:
    """Our :class:`SamplingConfig` as ``vllm.SamplingParams`` keyword arguments.

    Args:
        sampling: Decoding settings.
        eos_token_ids: Ids that end a completion (passed as ``stop_token_ids``).

    Returns:
        Keyword arguments for ``SamplingParams``.
    """
    kwargs: dict[str, Any] = {
        "n": sampling.group_size,
        "max_tokens": sampling.max_new_tokens,
        "stop_token_ids": [int(e) for e in eos_token_ids],
    }
    if sampling.greedy:
        kwargs.update(temperature=0.0, top_p=1.0, top_k=-1)  # temperature 0 is greedy in vLLM
    else:
        kwargs.update(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,  # -1 disables top-k in vLLM
        )
    return kwargs


class VLLMBackend:
    """Generation through a colocated ``vllm.LLM`` with per-agent LoRA requests.

    Args:
        agent: The GRPO agent that builds it (its model id, dtype, ``max_model_len``, LoRA rank).
        config: Engine settings.

    Raises:
        ImportError: If vLLM is not installed.
        ValueError: If the agent was built from a model object with no local path or hub id.
    """

    def __init__(self, agent: Any, config: VLLMConfig) -> None:
        self.vllm = import_vllm()
        self.config = config
        if not agent.model_id:
            raise ValueError(
                "the vLLM backend loads the base model by name: build the agent with model_name=<path or hub id> "
                "(or a model whose config has _name_or_path)"
            )
        rank = agent.model.peft_config[agent.adapter_name].r
        if rank > config.max_lora_rank:
            raise ValueError(f"LoRA rank r={rank} exceeds VLLMConfig.max_lora_rank={config.max_lora_rank}; raise it")
        self.pad_token_id = agent.pad_token_id
        self.eos_token_ids = list(agent.eos_token_ids)
        dtype = str(next(agent.model.parameters()).dtype).replace("torch.", "")
        engine_kwargs: dict[str, Any] = {
            "model": agent.model_id,
            "enable_lora": True,
            "max_lora_rank": config.max_lora_rank,
            "max_loras": config.max_loras,
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "tensor_parallel_size": config.tensor_parallel_size,
            "max_num_seqs": config.max_num_seqs,
            "enable_sleep_mode": config.sleep_mode,
            "enforce_eager": config.enforce_eager,
            "dtype": dtype,
        }
        if agent.max_model_len is not None:
            engine_kwargs["max_model_len"] = agent.max_model_len
        if config.max_num_batched_tokens is not None:
            engine_kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
        if agent.seed is not None:
            engine_kwargs["seed"] = agent.seed
        self.llm = self.vllm.LLM(**engine_kwargs)
        self._tmp = Path(tempfile.mkdtemp(prefix="llm_gym_vllm_"))
        self._requests: dict[str, Any] = {}
        self._next_id = 1
        self._asleep = False

    def sleep(self) -> None:
        """Release the engine's GPU memory (sleep mode only) while the trainer runs."""
        if self.config.sleep_mode and not self._asleep:
            self.llm.sleep(level=self.config.sleep_level)
            self._asleep = True

    def wake_up(self) -> None:
        """Restore the engine after :meth:`sleep`."""
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def sync(self, agent: Any) -> None:
        """Save the agent's adapter and serve it under a fresh LoRA id (the base never moves).

        Args:
            agent: The GRPO agent whose adapter changed.
        """
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        folder = self._tmp / agent.adapter_name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        state = get_peft_model_state_dict(agent.model, adapter_name=agent.adapter_name)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, folder / "adapter_model.safetensors",
                  metadata={"format": "pt"})  # fmt: skip
        agent.model.peft_config[agent.adapter_name].save_pretrained(str(folder))
        old = self._requests.get(agent.adapter_name)
        if old is not None:
            remove = getattr(getattr(self.llm, "llm_engine", None), "remove_lora", None)
            if remove is not None:
                remove(old.lora_int_id)
        lora_request_cls = importlib.import_module("vllm.lora.request").LoRARequest
        self._requests[agent.adapter_name] = lora_request_cls(
            f"{agent.adapter_name}-{self._next_id}", self._next_id, str(folder)
        )
        self._next_id += 1

    def generate(
        self, prompts: Sequence[dict[str, Any]], sampling: SamplingConfig, adapter_name: str = "default"
    ) -> GenerationOutput:
        """Generate with the named adapter; one ``llm.generate`` call for all prompts.

        Args:
            prompts: The environment's prompts.
            sampling: Decoding settings.
            adapter_name: Whose adapter to use (must have been :meth:`sync`-ed).

        Returns:
            The :class:`GenerationOutput`, in the same format as the HF backend.

        Raises:
            KeyError: If the adapter was never synced.
        """
        if adapter_name not in self._requests:
            raise KeyError(f"adapter {adapter_name!r} was never synced to vLLM: call sync(agent) first")
        _, _, unpadded = left_pad(prompts, self.pad_token_id)
        params = self.vllm.SamplingParams(**sampling_params_kwargs(sampling, self.eos_token_ids))
        self.wake_up()
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids.tolist()} for ids in unpadded],
            params,
            lora_request=self._requests[adapter_name],
            use_tqdm=False,
        )
        self.sleep()
        return convert_outputs(outputs, unpadded, sampling.group_size, self.eos_token_ids, self.pad_token_id)

    def close(self) -> None:
        """Delete the temporary adapter folders."""
        shutil.rmtree(self._tmp, ignore_errors=True)


def convert_outputs(
    outputs: Sequence[Any],
    unpadded: Sequence[Any],
    group_size: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
) -> GenerationOutput:
    """vLLM ``RequestOutput`` objects (one per prompt, ``n`` completions each) to our format.

    Args:
        outputs: ``llm.generate`` results, in prompt order; each has ``.outputs[j].token_ids``.
        unpadded: Each prompt's 1-D ids.
        group_size: Completions per prompt.
        eos_token_ids: Ids that end a completion.
        pad_token_id: Padding id.

    Returns:
        The :class:`GenerationOutput`.

    Raises:
        ValueError: If a prompt got a different number of completions than ``group_size``.
    """
    rows = []
    for i, request in enumerate(outputs):
        if len(request.outputs) != group_size:
            raise ValueError(f"vLLM returned {len(request.outputs)} completions for prompt {i}, expected {group_size}")
        rows.extend(list(c.token_ids) for c in request.outputs)
    return split_completions(unpadded, rows, group_size, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)


def build_vllm_backend(agent: Any, config: VLLMConfig | None = None) -> VLLMBackend:
    """The ``"vllm"`` backend of an agent (:data:`~llm_gym.algorithms.rollout.backend.BACKENDS`).

    Args:
        agent: The GRPO agent.
        config: Engine settings; default ``VLLMConfig()``.

    Returns:
        The backend.
    """
    return VLLMBackend(agent, config if config is not None else VLLMConfig())
