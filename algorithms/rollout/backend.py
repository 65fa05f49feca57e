"""Generation backends: turn a batch of prompts into ``G`` completions each.

A backend takes the environment's prompts (``{"input_ids": [1, L_i], "attention_mask": [1, L_i],
"text": str | None}``) and returns, per prompt, AgileRL's format:

* ``completion_ids``: ``[G, L_i + C_i]``, the prompt's own (unpadded) ids followed by the generated
  ids, right-padded with ``pad_token_id``;
* ``action_mask``: ``[G, L_i + C_i - 1]`` bool, aligned with next-token logits: position ``t`` is
  True when token ``t + 1`` is a generated token, up to and including the first EOS.

The mask is built from what was generated, never from the ids: with ``pad_token = eos_token``
(seed 001) padding cannot be told apart from a real EOS by looking at ids.

:class:`HFGenerationBackend` uses the training model itself (the CPU default: a lean decoding loop,
:mod:`llm_gym.algorithms.rollout.decoding`, or ``transformers`` ``generate``); the vLLM backend
lives in :mod:`llm_gym.algorithms.rollout.vllm` and is imported only when asked for.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "GenerationBackend",
    "GenerationOutput",
    "HFGenerationBackend",
    "MiniBatch",
    "PackedBatch",
    "SamplingConfig",
    "generation_budget",
    "left_pad",
    "mini_batches",
    "pack_completions",
    "select_rows",
    "split_completions",
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


@runtime_checkable
class GenerationBackend(Protocol):
    """What the GRPO agent needs from a generator.

    A backend may keep its own copy of the weights (vLLM); :meth:`sync` is called before
    generating whenever the trainable adapter changed since the last call.
    """

    def generate(
        self, prompts: Sequence[dict[str, Any]], sampling: SamplingConfig, adapter_name: str = "default"
    ) -> GenerationOutput:
        """Generate ``sampling.group_size`` completions for each prompt with the named adapter."""
        ...

    def sync(self, agent: Any) -> None:
        """Bring the backend's weights up to date with the agent's adapter."""
        ...


def _prompt_ids(prompt: dict[str, Any], index: int) -> Tensor:
    """The prompt's unpadded ids as a 1-D LongTensor ``[L]``."""
    try:
        ids = prompt["input_ids"]
    except (KeyError, TypeError):
        raise ValueError(
            f"prompt {index} must be a dict with 'input_ids' ([1, L] tensor), as ReasoningGym.reset() "
            f"returns; got {type(prompt).__name__}"
        ) from None
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"prompt {index}: input_ids must be [1, L], got {tuple(ids.shape)}")
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"prompt {index}: input_ids must be a non-empty [1, L] tensor, got {tuple(ids.shape)}")
    mask = prompt.get("attention_mask")
    if mask is not None:
        mask = torch.as_tensor(mask).reshape(-1).bool()
        if mask.shape != ids.shape:
            raise ValueError(
                f"prompt {index}: attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}"
            )
        ids = ids[mask]  # drop any padding the caller left in
    return ids


def left_pad(prompts: Sequence[dict[str, Any]], pad_token_id: int) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Left-pad prompts into one batch, as decoder-only generation needs.

    Args:
        prompts: Dicts with ``input_ids`` of shape ``[1, L_i]`` (and optionally ``attention_mask``).
        pad_token_id: Id written into the padding.

    Returns:
        ``(input_ids [P, L], attention_mask [P, L], unpadded)`` where ``L = max L_i`` and
        ``unpadded`` holds each prompt's own 1-D ids.

    Raises:
        ValueError: If there are no prompts or one is malformed.
    """
    if len(prompts) == 0:
        raise ValueError("got no prompts: pass the list that env.reset() / env.step() returned")
    unpadded = [_prompt_ids(p, i) for i, p in enumerate(prompts)]
    width = max(len(ids) for ids in unpadded)
    input_ids = torch.full((len(unpadded), width), pad_token_id, dtype=torch.long)  # [P, L]
    attention = torch.zeros((len(unpadded), width), dtype=torch.long)  # [P, L]
    for row, ids in enumerate(unpadded):
        input_ids[row, width - len(ids) :] = ids
        attention[row, width - len(ids) :] = 1
    return input_ids, attention, unpadded


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


def _first_eos_lengths(generated: Tensor, eos_token_ids: Sequence[int]) -> Tensor:
    """Number of real generated tokens per row: up to and including the first EOS.

    Args:
        generated: Generated ids ``[N, C]``.
        eos_token_ids: Ids that end a completion.

    Returns:
        LongTensor ``[N]``; ``C`` for rows with no EOS.
    """
    num, width = generated.shape
    if width == 0:
        return torch.zeros(num, dtype=torch.long)
    is_eos = torch.isin(generated, torch.tensor(list(eos_token_ids), dtype=generated.dtype))  # [N, C]
    has_eos = is_eos.any(dim=1)  # [N]
    first = is_eos.int().argmax(dim=1)  # [N], index of the first EOS (0 when none)
    return torch.where(has_eos, first + 1, torch.full_like(first, width))


def split_completions(
    unpadded_prompts: Sequence[Tensor],
    generated: Tensor | Sequence[Sequence[int]],
    group_size: int,
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
) -> GenerationOutput:
    """Turn ``P * G`` generated rows into per-prompt ``[G, L_i + C_i]`` tensors and action masks.

    Each group is right-padded to the longest real completion in that group (``C_i``), so short
    groups carry no dead columns into the update. Tokens after the first EOS are replaced by
    ``pad_token_id`` and are False in the mask.

    Args:
        unpadded_prompts: Each prompt's own 1-D ids (``[L_i]``), in order.
        generated: Only the generated ids, rows ordered prompt-major (prompt 0's ``G`` rows first):
            a tensor ``[P * G, C]`` or a list of per-row id lists of any lengths.
        group_size: Completions per prompt, ``G``.
        eos_token_ids: Ids that end a completion.
        pad_token_id: Id of the padding.

    Returns:
        The :class:`GenerationOutput`.

    Raises:
        ValueError: If the number of rows is not ``P * G``.
    """
    if not isinstance(generated, Tensor):
        rows = [list(r) for r in generated]
        width = max((len(r) for r in rows), default=0)
        padded = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            padded[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        generated = padded
        lengths = torch.minimum(lengths, _first_eos_lengths(generated, eos_token_ids))
    else:
        generated = generated.long().cpu()
        lengths = _first_eos_lengths(generated, eos_token_ids)  # [P*G]
    expected = len(unpadded_prompts) * group_size
    if generated.shape[0] != expected:
        raise ValueError(
            f"got {generated.shape[0]} generated rows for {len(unpadded_prompts)} prompts x group_size "
            f"{group_size} = {expected}"
        )
    completion_ids, action_masks = [], []
    for p, prompt in enumerate(unpadded_prompts):
        rows = slice(p * group_size, (p + 1) * group_size)
        group_len = lengths[rows]  # [G]
        width = max(int(group_len.max()), 1)  # keep one column even if nothing was generated
        gen = generated[rows, :width].clone()  # [G, C_i]
        if gen.shape[1] < width:  # pragma: no cover - only when the raw width is 0
            gen = torch.nn.functional.pad(gen, (0, width - gen.shape[1]), value=pad_token_id)
        real = torch.arange(width).unsqueeze(0) < group_len.unsqueeze(1)  # [G, C_i]
        gen[~real] = pad_token_id
        prompt_len = len(prompt)
        ids = torch.cat([prompt.cpu().unsqueeze(0).expand(group_size, -1), gen], dim=1)  # [G, L_i + C_i]
        # Logit position t predicts token t + 1: generated token j sits at L_i + j, so it is
        # predicted at position L_i - 1 + j.
        mask = torch.zeros((group_size, prompt_len + width - 1), dtype=torch.bool)  # [G, L_i + C_i - 1]
        mask[:, prompt_len - 1 :] = real
        completion_ids.append(ids)
        action_masks.append(mask)
    return GenerationOutput(completion_ids=completion_ids, action_masks=action_masks)


@dataclass
class PackedBatch:
    """All sequences of a batch of completions in one right-padded tensor.

    Attributes:
        ids: ``[B, T]`` prompt + completion ids, prompt-major (prompt 0's ``G`` rows first).
        attention: ``[B, T]`` 1 on the prompt and the real completion tokens, 0 after the first EOS.
        mask: ``[B, T - 1]`` bool, True where the next token is a generated one.
        lengths: ``[B]`` prompt + real completion tokens of each row.
    """

    ids: Tensor
    attention: Tensor
    mask: Tensor
    lengths: Tensor


@dataclass
class MiniBatch:
    """Rows of a :class:`PackedBatch`, trimmed to their own width and completion window.

    Attributes:
        rows: Which rows of the packed batch.
        ids: ``[b, t]`` ids (columns past the longest real row are dropped).
        attention: ``[b, t]`` attention mask.
        first: First logit position that predicts a completion token in any row (the shared
            prompt prefix before it needs no log-probs).
        mask: ``[b, t - 1 - first]`` bool, the completion mask from ``first`` on.
    """

    rows: slice
    ids: Tensor
    attention: Tensor
    first: int
    mask: Tensor


def pack_completions(
    completion_ids: Sequence[Tensor], action_masks: Sequence[Tensor], group_size: int, pad_token_id: int
) -> PackedBatch:
    """Stack per-prompt completions (the :class:`GenerationOutput` format) into one batch.

    Attention is rebuilt from the action masks, not from the ids (padding may equal EOS).

    Args:
        completion_ids: Per prompt ``[G, S_i]`` ids.
        action_masks: Per prompt ``[G, S_i - 1]`` bool masks.
        group_size: ``G``.
        pad_token_id: Id written into the padding.

    Returns:
        The :class:`PackedBatch`.

    Raises:
        ValueError: If a prompt's shapes do not match ``[G, S]`` / ``[G, S - 1]``.
    """
    rows_ids, rows_mask = [], []
    for i, (ids, mask) in enumerate(zip(completion_ids, action_masks, strict=True)):
        ids, mask = torch.as_tensor(ids).cpu(), torch.as_tensor(mask).cpu().bool()
        if ids.dim() != 2 or ids.shape[0] != group_size or tuple(mask.shape) != (ids.shape[0], ids.shape[1] - 1):
            raise ValueError(
                f"prompt {i}: completion_ids must be [G={group_size}, S] and its action mask [G, S - 1]; got "
                f"{tuple(ids.shape)} and {tuple(mask.shape)}"
            )
        rows_ids.extend(ids)
        rows_mask.extend(mask)
    width = max(len(r) for r in rows_ids)
    num = len(rows_ids)
    ids = torch.full((num, width), pad_token_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((num, width - 1), dtype=torch.bool)  # [B, T-1]
    for b, (r, m) in enumerate(zip(rows_ids, rows_mask, strict=True)):
        ids[b, : len(r)] = r
        mask[b, : len(m)] = m
    # Real length = last generated position + 2 (mask position t predicts token t + 1); a row
    # with no generated token at all keeps its whole width.
    cols = torch.arange(width - 1).expand(num, -1)
    last = torch.where(mask, cols, torch.full_like(cols, -1)).max(dim=1).values  # [B]
    lengths = torch.where(last >= 0, last + 2, torch.tensor([len(r) for r in rows_ids]))
    attention = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()  # [B, T]
    return PackedBatch(ids=ids, attention=attention, mask=mask, lengths=lengths)


def select_rows(packed: PackedBatch, keep: Tensor) -> PackedBatch:
    """The rows of ``packed`` where ``keep`` (``[B]`` bool) is True, in order.

    Args:
        packed: The batch.
        keep: Which rows to keep.

    Returns:
        A packed batch of the kept rows (the same object when every row is kept).
    """
    keep = keep.to(torch.bool).cpu()
    if bool(keep.all()):
        return packed
    return PackedBatch(ids=packed.ids[keep], attention=packed.attention[keep], mask=packed.mask[keep],
                       lengths=packed.lengths[keep])  # fmt: skip


def mini_batches(packed: PackedBatch, batch_size: int, device: torch.device | str = "cpu") -> list[MiniBatch]:
    """Split a packed batch into consecutive mini-batches of ``batch_size`` rows, on ``device``.

    Args:
        packed: The batch.
        batch_size: Rows per mini-batch (the last one may be smaller).
        device: Where the tensors go.

    Returns:
        The mini-batches, in row order.
    """
    out = []
    for start in range(0, packed.ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        width = int(packed.lengths[rows].max())
        mask = packed.mask[rows, : width - 1]  # [b, t-1]
        any_col = mask.any(dim=0)
        first = int(any_col.int().argmax()) if bool(any_col.any()) else width - 2
        out.append(MiniBatch(
            rows=rows,
            ids=packed.ids[rows, :width].to(device),
            attention=packed.attention[rows, :width].to(device),
            first=first,
            mask=mask[:, first:].to(device),
        ))
    return out


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
