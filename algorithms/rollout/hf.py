"""The Hugging Face generation backend: the training model itself decodes (the CPU default)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from llm_gym.algorithms.rollout.backend import GenerationOutput, SamplingConfig
from llm_gym.algorithms.rollout.completions import left_pad, split_completions

__all__ = ["HFGenerationBackend", "build_hf_backend", "resolve_eos"]


def resolve_eos(model: Any, eos_token_id: int | Sequence[int] | None, pad_token_id: int) -> list[int]:
    """The ids that end a completion: ``eos_token_id`` if given, else the model's generation config's.

    Args:
        model: The causal LM.
        eos_token_id: Id(s) given by the user, or None.
        pad_token_id: Fallback (with a warning) when no EOS id is known.

    Returns:
        The EOS ids.
    """
    if eos_token_id is None:
        for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
            eos_token_id = getattr(source, "eos_token_id", None)
            if eos_token_id is not None:
                break
    if eos_token_id is None:
        warnings.warn(
            "no eos_token_id given or found in the model config: using pad_token_id as EOS",
            stacklevel=3,
        )
        eos_token_id = pad_token_id
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return [int(i) for i in ids]


class HFGenerationBackend:
    """Generation with the training model itself: one batched decoding loop for all prompts.

    Prompts are left-padded into one ``[P, L]`` batch. By default the lean loop of
    :mod:`llm_gym.algorithms.rollout.decoding` runs: each prompt is prefilled once and its KV cache shared
    by its ``G`` completions, finished rows leave the batch, and LoRA layers run as merged plain
    linears while decoding. ``use_generate=True`` calls ``transformers``' ``generate`` instead
    (``num_return_sequences = G``), e.g. for models the lean loop does not support. Runs under
    ``torch.no_grad()`` (not ``inference_mode``: its tensors could not enter the backward pass of
    the update) with the model in eval mode and the KV cache on.

    Args:
        model: A causal LM (a ``PeftModel`` with the agent's adapter active).
        pad_token_id: Padding id.
        eos_token_ids: Ids that end a completion.
        use_generate: Decode with ``model.generate`` rather than the lean loop.
        merge_lora: Lean loop only: decode with merged LoRA weights (a transient copy of the
            adapted linear weights; the trained parameters are untouched).
        preallocate_cache: Lean loop only: KV cache buffers sized once for the whole run
            (:mod:`~llm_gym.algorithms.plumbing.kv_cache`) instead of a concatenation per step.
    """

    def __init__(
        self,
        model: Any,
        pad_token_id: int,
        eos_token_ids: Sequence[int],
        *,
        use_generate: bool = False,
        merge_lora: bool = True,
        preallocate_cache: bool = True,
    ) -> None:
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.eos_token_ids = [int(e) for e in eos_token_ids]
        self.use_generate = use_generate
        self.merge_lora = merge_lora
        self.preallocate_cache = preallocate_cache

    def sync(self, agent: Any) -> None:
        """Nothing to do: this backend generates with the training model itself."""

    def sleep(self) -> None:
        """Nothing to do: the training model holds no memory apart from the trainer's."""

    def close(self) -> None:
        """Nothing to do: the model belongs to the agent (the backend keeps generating after this)."""

    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover - a model always has parameters
            return torch.device("cpu")

    def generate(
        self, prompts: Sequence[dict[str, Any]], sampling: SamplingConfig, adapter_name: str = "default"
    ) -> GenerationOutput:
        """Generate ``sampling.group_size`` completions for each prompt in one batched decoding run.

        Args:
            prompts: The environment's prompts.
            sampling: Decoding settings (the budget is already cut to fit the context).
            adapter_name: Unused: the agent activates its adapter on the model before calling.

        Returns:
            The :class:`GenerationOutput`.
        """
        input_ids, attention, unpadded = left_pad(prompts, self.pad_token_id)
        device = self._device()
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling
        try:
            with torch.no_grad():
                if self.use_generate:
                    generated = self._hf_generate(input_ids.to(device), attention.to(device), sampling)
                else:
                    generated = self._lean(input_ids.to(device), attention.to(device), sampling)  # [P*G, C]
        finally:
            self.model.train(was_training)
        return split_completions(
            unpadded, generated, sampling.group_size, eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )  # fmt: skip

    def _lean(self, input_ids: Tensor, attention: Tensor, sampling: SamplingConfig) -> Tensor:
        from llm_gym.algorithms.rollout.decoding import decode, merged_lora

        merge = merged_lora(self.model) if self.merge_lora else contextlib.nullcontext()
        with merge:
            return decode(
                self.model, input_ids, attention, group_size=sampling.group_size,
                max_new_tokens=sampling.max_new_tokens, eos_token_ids=self.eos_token_ids,
                pad_token_id=self.pad_token_id, greedy=sampling.greedy, temperature=sampling.temperature,
                top_k=sampling.top_k, top_p=sampling.top_p, preallocate_cache=self.preallocate_cache,
            )  # fmt: skip

    def _hf_generate(self, input_ids: Tensor, attention: Tensor, sampling: SamplingConfig) -> Tensor:
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "num_return_sequences": sampling.group_size,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_ids,
            "use_cache": True,
        }
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,  # 0 disables top-k in transformers
            )
        out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)  # [P*G, L + C]
        return out[:, input_ids.shape[1] :]  # [P*G, C]


def build_hf_backend(agent: Any, config: Mapping[str, Any] | None = None) -> HFGenerationBackend:
    """The ``"hf"`` backend of an agent: its own training model decodes.

    Args:
        agent: The GRPO agent (``model``, ``pad_token_id``, ``eos_token_ids``).
        config: Options of :class:`HFGenerationBackend` (``use_generate``, ``merge_lora``,
            ``preallocate_cache``), or None for the defaults.

    Returns:
        The backend.
    """
    return HFGenerationBackend(agent.model, agent.pad_token_id, agent.eos_token_ids, **dict(config or {}))
