"""Generation backends: the protocol, its settings and its outputs, and the backends chosen by name.

A backend takes the environment's prompts (``{"input_ids": [1, L_i], "attention_mask": [1, L_i],
"text": str | None}``) and returns, per prompt, ``G`` completions in the format of
:mod:`~llm_gym.algorithms.rollout.completions` (ids ``[G, L_i + C_i]``, action masks
``[G, L_i + C_i - 1]``). Backends are named in :data:`BACKENDS` and built by :func:`make_backend`:
``"hf"`` (:mod:`~llm_gym.algorithms.rollout.hf`, the training model itself, the CPU default),
``"vllm"`` (:mod:`~llm_gym.algorithms.rollout.vllm`, a colocated engine, imported only when asked for) and
``"vllm-server"`` (:mod:`~llm_gym.algorithms.rollout.vllm_server`, a separate ``vllm serve`` over HTTP).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = [
    "BACKENDS",
    "AdapterBatch",
    "BackendSpec",
    "GenerationBackend",
    "GenerationOutput",
    "SamplingConfig",
    "check_backend",
    "generation_budget",
    "make_backend",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode.

    Attributes:
        group_size: Completions per prompt (``G``); 1 for evaluation.
        max_new_tokens: Generation budget in tokens per completion.
        greedy: Take the most likely token (evaluation); the sampling fields are then ignored.
        temperature: Softmax temperature when sampling.
        top_p: Nucleus sampling threshold (1.0 = off).
        top_k: Keep the ``top_k`` most likely tokens (0 = off).
    """

    group_size: int
    max_new_tokens: int
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class GenerationOutput:
    """Completions of one batch, per prompt.

    Attributes:
        completion_ids: Per prompt a LongTensor ``[G, L_i + C_i]`` (prompt then completion).
        action_masks: Per prompt a BoolTensor ``[G, L_i + C_i - 1]`` (see module docstring).
    """

    completion_ids: list[Tensor]
    action_masks: list[Tensor]


@dataclass(frozen=True)
class AdapterBatch:
    """Prompts to complete with one adapter: one part of a population's single generation call.

    A backend that serves several adapters at once has ``generate_batches(batches) ->
    list[GenerationOutput]`` (both vLLM backends); the population's rollout
    (:func:`~llm_gym.algorithms.rollout.population.population_generate`) uses it when every agent
    shares that backend.

    Attributes:
        adapter_name: The adapter (the agent's ``adapter_name``).
        prompts: The environment's prompts.
        sampling: Decoding settings of that agent.
    """

    adapter_name: str
    prompts: Sequence[dict[str, Any]]
    sampling: SamplingConfig


@runtime_checkable
class GenerationBackend(Protocol):
    """What the GRPO agent needs from a generator.

    A backend may keep its own copy of the weights (vLLM); :meth:`sync` is called before
    generating whenever the trainable adapter changed since the last call. Phases: the agent calls
    :meth:`sleep` once at the start of each learn phase (a backend holding GPU memory releases it
    and takes it back at its next generation); :meth:`close` ends the backend for good. Both are
    no-ops for a backend that holds nothing of its own (HF).
    """

    def generate(
        self, prompts: Sequence[dict[str, Any]], sampling: SamplingConfig, adapter_name: str = "default"
    ) -> GenerationOutput:
        """Generate ``sampling.group_size`` completions for each prompt with the named adapter."""
        ...

    def sync(self, agent: Any) -> None:
        """Bring the backend's weights up to date with the agent's adapter."""
        ...

    def sleep(self) -> None:
        """A learn phase starts: release what generation holds until the next generation call."""
        ...

    def close(self) -> None:
        """Release everything the backend holds (idempotent); it cannot generate afterwards."""
        ...


def generation_budget(
    prompt_len: int, max_output_tokens: int, max_model_len: int | None, *, warn: bool = True
) -> int:
    """Tokens that may be generated after a prompt of ``prompt_len`` tokens.

    The budget is cut to ``max_model_len - prompt_len`` when the prompt plus ``max_output_tokens``
    would not fit, with a warning.

    Args:
        prompt_len: Length of the (longest) prompt in tokens.
        max_output_tokens: Requested generation budget.
        max_model_len: Context length of the model (prompt + completion), or None for no limit.
        warn: Log a warning when the budget is cut.

    Returns:
        The budget, at least 1.

    Raises:
        ValueError: If the prompt alone fills the context (no token could be generated).
    """
    if max_model_len is None or prompt_len + max_output_tokens <= max_model_len:
        return max_output_tokens
    budget = max_model_len - prompt_len
    if budget < 1:
        raise ValueError(
            f"a prompt of {prompt_len} tokens leaves no room to generate within max_model_len={max_model_len}; "
            f"raise max_model_len or drop long prompts (ReasoningGym(max_context_length=...))"
        )
    if warn:
        logger.warning(
            "prompt of %d tokens + max_output_tokens=%d exceeds max_model_len=%d: generating at most %d tokens "
            "for this batch (warned once per agent)",
            prompt_len, max_output_tokens, max_model_len, budget,
        )  # fmt: skip
    return budget


# --------------------------------------------------------------------------------------------------
# Backends by name
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendSpec:
    """Where a generation backend comes from: ``"module:function"`` references, imported only when used.

    Attributes:
        build: ``(agent, config) -> GenerationBackend``; ``config`` is the backend's own settings
            object (e.g. :class:`~llm_gym.algorithms.rollout.vllm.VLLMConfig`) or None for its defaults.
        preflight: ``() -> None``, run before the agent loads any weights, so a missing dependency
            fails in seconds (e.g. vLLM not installed); None when there is nothing to check.
    """

    build: str
    preflight: str | None = None


BACKENDS: Mapping[str, BackendSpec] = MappingProxyType({
    "hf": BackendSpec("llm_gym.algorithms.rollout.hf:build_hf_backend"),
    "vllm": BackendSpec("llm_gym.algorithms.rollout.vllm:build_vllm_backend",
                        preflight="llm_gym.algorithms.rollout.vllm:import_vllm"),
    "vllm-server": BackendSpec("llm_gym.algorithms.rollout.vllm_server:build_vllm_server_backend"),
})  # fmt: skip
"""The generation backends by name (``GRPOConfig.backend``). A new backend is one entry here."""


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _spec(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends are {sorted(BACKENDS)}")
    return BACKENDS[name]


def check_backend(name: str) -> None:
    """Run backend ``name``'s preflight check (before any weights are loaded).

    Raises:
        ValueError: On an unknown name.
        ImportError: When the backend's dependency is missing (with how to install it).
    """
    spec = _spec(name)
    if spec.preflight is not None:
        _load(spec.preflight)()


def make_backend(name: str, agent: Any, config: Any = None) -> GenerationBackend:
    """Build generation backend ``name`` for ``agent``.

    Args:
        name: A key of :data:`BACKENDS`.
        agent: The agent it generates for (its model, adapter, special ids, context length).
        config: The backend's settings, or None for its defaults.

    Returns:
        The backend.

    Raises:
        ValueError: On an unknown name.
    """
    return _load(_spec(name).build)(agent, config)
