"""A lean decoding loop for GRPO rollouts: prefill once per prompt, sample ``G`` continuations.

``transformers``' ``generate`` spends most of a small model's decoding step in Python (logits
processors, stopping criteria, input preparation) and PEFT's LoRA wrappers add a few more
calls per linear layer. For GRPO every prompt is decoded ``G`` times, so this module:

* runs the prompt prefill once per prompt (``P`` rows, not ``P * G``) and repeats the
  ``DynamicCache`` ``G`` times along the batch (:func:`prefill`);
* decodes with plain ``model(...)`` calls and its own temperature / top-k / top-p sampling
  (:func:`filter_logits`, :func:`next_tokens`), dropping rows from the batch as soon as they emit
  an EOS (:func:`decode`);
* optionally swaps each LoRA-wrapped linear layer for a plain ``nn.Linear`` holding the merged
  weight ``W + scale * B @ A`` while decoding (:func:`~llm_gym.algorithms.lora_swap.merged_lora`,
  re-exported here): one matmul and no wrapper per layer. The trainable parameters are never
  touched; the merged copies are dropped afterwards.

Position ids and masks follow ``generate``: positions count real tokens (``cumsum - 1``, 0 on
the left padding) and the 2-D attention mask grows by one column per step, so greedy decoding
gives the same tokens as ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from llm_gym.algorithms.plumbing.kv_cache import preallocate
from llm_gym.algorithms.plumbing.lora_swap import base_model_only, merged_lora

__all__ = [
    "accepts_logits_to_keep",
    "base_model_only",
    "decode",
    "filter_logits",
    "merged_lora",
    "next_tokens",
    "prefill",
    "sample_categorical",
]

logger = logging.getLogger(__name__)


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Apply temperature, then top-k, then top-p (nucleus) filtering, as ``generate`` orders them.

    Args:
        logits: Next-token logits ``[N, V]``.
        temperature: Divides the logits; must be > 0.
        top_k: Keep the ``top_k`` largest logits per row (ties with the k-th kept); 0 = off.
        top_p: Keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (at least one token); 1.0 = off.

    Returns:
        Float logits ``[N, V]`` with removed tokens set to ``-inf``.

    Raises:
        ValueError: On a temperature <= 0, a negative top_k or a top_p outside (0, 1].
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use greedy decoding for 0")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {top_p}")
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # [N, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)  # ascending
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
        drop_sorted = cumulative <= 1.0 - top_p  # the low tail whose mass stays below 1 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def next_tokens(
    logits: Tensor,
    *,
    greedy: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row: the argmax, or a sample from the filtered softmax.

    Args:
        logits: Next-token logits ``[N, V]``.
        greedy: Take the argmax (sampling settings ignored).
        temperature: See :func:`filter_logits`.
        top_k: See :func:`filter_logits`.
        top_p: See :func:`filter_logits`.
        generator: RNG for sampling; None uses torch's global RNG (seeded by ``torch.manual_seed``).

    Returns:
        LongTensor ``[N]``.
    """
    if greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)  # [N, V]
    return sample_categorical(probs, generator=generator)


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row from unnormalised probabilities, by inverting the cumulative sum.

    Needs one uniform number per row where ``torch.multinomial`` (exponential race) draws one
    per vocabulary entry: ~10x faster for a 512-token vocabulary on CPU. With ``u`` uniform in
    ``(0, 1]`` and ``c`` the float64 running sum, the pick is the first ``i`` with
    ``c_i >= u * c_V``; hence ``c_i > c_{i-1}``, so a zero-probability (filtered) token is never drawn.

    Args:
        probs: Non-negative weights ``[N, V]`` with a positive sum per row.
        generator: RNG (None: torch's global RNG).

    Returns:
        LongTensor ``[N]`` of drawn indices.
    """
    cdf = probs.double().cumsum(dim=-1)  # [N, V]
    u = 1.0 - torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device, generator=generator)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def prefill(
    model: Any, input_ids: Tensor, attention_mask: Tensor, group_size: int, *, share: bool = True
) -> tuple[Any, Tensor, Tensor, Tensor]:
    """Run the prompts through the model and return a KV cache with ``group_size`` rows per prompt.

    Args:
        model: A causal LM taking ``past_key_values`` / ``position_ids`` / ``logits_to_keep``.
        input_ids: Left-padded prompts ``[P, L]``.
        attention_mask: ``[P, L]``, 0 on the padding.
        group_size: Rows per prompt, ``G``.
        share: Prefill each prompt once and repeat its cache ``G`` times (True), or prefill all
            ``P * G`` copies (False: what ``generate(num_return_sequences=G)`` does).

    Returns:
        ``(cache, logits [P*G, V], attention_mask [P*G, L], last_position [P*G, 1])``, rows
        prompt-major (prompt 0's ``G`` rows first); ``logits`` are those of the first new token.
    """
    from transformers import DynamicCache

    if not share:
        input_ids = input_ids.repeat_interleave(group_size, dim=0)
        attention_mask = attention_mask.repeat_interleave(group_size, dim=0)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # [R, L]
    cache = DynamicCache(config=model.config)
    last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
        use_cache=True, **last_only,
    )  # fmt: skip
    logits = out.logits[:, -1].float()  # [R, V]
    last = positions[:, -1:]  # [R, 1]
    if share and group_size > 1:
        cache.batch_repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)
        attention_mask = attention_mask.repeat_interleave(group_size, dim=0)
        last = last.repeat_interleave(group_size, dim=0)
    return cache, logits, attention_mask, last


def decode(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    group_size: int,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    share_prefill: bool = True,
    drop_finished: bool = True,
    preallocate_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Generate ``group_size`` completions per prompt with a plain KV-cached decoding loop.

    The caller sets eval mode and ``torch.no_grad()``. A row stops at its first EOS (kept in the
    output); everything after it is ``pad_token_id``. With ``drop_finished`` the finished rows
    leave the batch (and the cache) at once, so later steps only compute live rows.

    Args:
        model: A causal LM (plain or PEFT-wrapped).
        input_ids: Left-padded prompts ``[P, L]`` on the model's device.
        attention_mask: ``[P, L]``, 0 on the padding.
        group_size: Completions per prompt, ``G``.
        max_new_tokens: Budget per completion; must be >= 1.
        eos_token_ids: Ids that end a completion.
        pad_token_id: Written after a row's EOS.
        greedy: Argmax decoding instead of sampling.
        temperature: Sampling temperature.
        top_k: Top-k filter (0 = off).
        top_p: Nucleus filter (1.0 = off).
        share_prefill: Prefill each prompt once (see :func:`prefill`).
        drop_finished: Remove rows that emitted EOS from the decoding batch.
        preallocate_cache: Keep the KV cache in buffers sized for the whole run, written in place
            (:mod:`~llm_gym.algorithms.plumbing.kv_cache`), instead of concatenating on every step.
        generator: Sampling RNG (None: torch's global RNG).

    Returns:
        Generated ids ``[P * G, C]`` (``C <= max_new_tokens``: the loop stops when every row has
        finished), rows prompt-major, on the input's device.

    Raises:
        ValueError: If ``max_new_tokens < 1`` or ``group_size < 1``.
    """
    if max_new_tokens < 1 or group_size < 1:
        raise ValueError(
            f"max_new_tokens and group_size must be >= 1, got {max_new_tokens} and {group_size}; check the "
            f"agent's max_output_tokens / group_size"
        )
    device = input_ids.device
    eos = torch.tensor(sorted({int(e) for e in eos_token_ids}), dtype=torch.long, device=device)
    cache, logits, attention, position = prefill(model, input_ids, attention_mask, group_size, share=share_prefill)
    if preallocate_cache:
        preallocate(cache, attention.shape[1] + max_new_tokens)
    rows = attention.shape[0]
    own_mask = _sdpa_full_attention(model)
    last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out = torch.full((rows, max_new_tokens), int(pad_token_id), dtype=torch.long, device=device)  # [N, C]
    live = torch.arange(rows, device=device)  # original row of each batch row
    finished = torch.zeros(rows, dtype=torch.bool, device=device)  # used without drop_finished
    length = max_new_tokens
    for step in range(max_new_tokens):
        token = next_tokens(logits, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator)  # [n]  # fmt: skip
        out[live, step] = token
        done = torch.isin(token, eos)  # [n]
        if step == max_new_tokens - 1:
            break
        if drop_finished:
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)  # [n']
                if keep.numel() == 0:
                    length = step + 1
                    break
                live, token, position, attention = live[keep], token[keep], position[keep], attention[keep]
                cache.batch_select_indices(keep)
        else:
            finished = finished | done
            if bool(finished.all()):
                length = step + 1
                break
            token = token.masked_fill(finished, int(pad_token_id))
        position = position + 1
        attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=1)
        # One query per row: the mask is just "which cached keys are real", built here instead of
        # by the model's general mask factory on every step.
        mask = attention.bool()[:, None, None, :] if own_mask else attention  # 4-D masks pass through as-is
        logits = model(
            input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position, past_key_values=cache,
            use_cache=True, **last_only,
        ).logits[:, -1].float()  # [n, V]  # fmt: skip
    if not drop_finished:
        # Rows kept decoding after their EOS: blank what they produced afterwards.
        after = torch.cumsum(torch.isin(out, eos).long(), dim=1) - torch.isin(out, eos).long() > 0
        out = out.masked_fill(after, int(pad_token_id))
    return out[:, :length]


@functools.lru_cache(maxsize=64)
def _forward_takes_logits_to_keep(cls: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the causal LM (under any PEFT wrapper) computes logits for the last ``k`` positions only.

    Args:
        model: A causal LM, plain or a ``PeftModel``.

    Returns:
        True when the innermost model's ``forward`` takes ``logits_to_keep`` (most
        ``transformers`` causal LMs).
    """
    inner = model
    get_base = getattr(inner, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
    return _forward_takes_logits_to_keep(type(inner))


def _sdpa_full_attention(model: Any) -> bool:
    """Whether the decoding step may pass its own boolean ``[N, 1, 1, K]`` key mask.

    True for models whose every layer is full attention under PyTorch SDPA (e.g. Qwen2, Llama):
    ``transformers``' mask factory returns a ready 4-D mask as it is, and SDPA reads a boolean
    mask as "True = attend". Anything else (eager or flash attention, sliding-window layers) gets
    the 2-D mask and builds its own.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    types = getattr(text, "layer_types", None)
    return types is None or all(t == "full_attention" for t in types)
