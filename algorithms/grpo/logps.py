"""Log-probabilities of generated tokens, with each prompt's forward pass shared by its group.

In a GRPO batch every prompt appears ``G`` times, once per sampled completion. A plain forward
over the ``[b, prompt + completion]`` rows computes each prompt ``G`` times, in the reference
pass, the policy pass and the backward. :func:`completion_logps` instead runs each distinct
prompt once (``u`` rows, left-padded), repeats its KV cache to the ``b`` rows of its group, and
runs only the completions on top of it. Autograd sums the gradients of the repeated cache back
into the one prompt forward, so the log-probs and the LoRA gradients equal the plain pass's (up
to float rounding), while the prompt's share of the work drops ``G``-fold.

The positions match the plain pass: prompts are left-padded, positions count real tokens, and the
completion of a row with an ``L``-token prompt starts at position ``L``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llm_gym.algorithms.rollout.completions import MiniBatch
from llm_gym.algorithms.rollout.decoding import accepts_logits_to_keep

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "PromptGroups",
    "completion_logps",
    "prompt_groups",
    "selective_log_softmax",
    "token_entropy",
]

# Rows of the flattened [B*T, V] logits handled at once. With a 152k vocabulary one fp32 chunk is
# ~150 MB, small next to the logits themselves, while still keeping the Python loop short.
DEFAULT_CHUNK_SIZE = 256


# --------------------------------------------------------------------------------------------------
# Log-probabilities and entropy of chosen tokens, chunked over rows
# --------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16 logsumexp over a large vocabulary loses ~2 decimal digits, enough to make
    # exp(logp - old_logp) visibly noisy, so half types are computed (and returned) in fp32.
    return torch.promote_types(dtype, torch.float32)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """Chunked ``log_softmax(logits).gather(index)`` that saves nothing but its inputs.

    Letting autograd trace the chunks would keep one fp32 copy of every chunk alive until backward
    (a full upcast copy of the logits for bf16 models); recomputing the softmax per chunk in
    backward keeps peak extra memory at one chunk in both passes.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, chunk_size: int) -> Tensor:  # type: ignore[override]
        vocab = logits.shape[-1]
        flat_logits = logits.reshape(-1, vocab)  # [N, V]
        flat_index = index.reshape(-1, 1)  # [N, 1]
        out_dtype = _compute_dtype(logits.dtype)
        out = torch.empty(flat_logits.shape[0], dtype=out_dtype, device=logits.device)  # [N]
        for start in range(0, flat_logits.shape[0], chunk_size):
            stop = start + chunk_size
            chunk = flat_logits[start:stop].to(out_dtype)  # [n, V]
            picked = chunk.gather(1, flat_index[start:stop]).squeeze(1)  # [n]
            out[start:stop] = picked - torch.logsumexp(chunk, dim=-1)
        ctx.save_for_backward(logits, index)
        ctx.chunk_size = chunk_size
        return out.view(index.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        logits, index = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        vocab = logits.shape[-1]
        flat_logits = logits.reshape(-1, vocab)  # [N, V]
        flat_index = index.reshape(-1, 1)  # [N, 1]
        flat_grad = grad_out.reshape(-1, 1)  # [N, 1]
        compute_dtype = _compute_dtype(logits.dtype)
        grad_logits = torch.empty_like(flat_logits)  # [N, V]
        for start in range(0, flat_logits.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            probs = torch.softmax(flat_logits[start:stop].to(compute_dtype), dim=-1)  # [n, V]
            g_out = flat_grad[start:stop].to(compute_dtype)  # [n, 1]
            # d/dz_j [z_i - logsumexp(z)] = 1[j == i] - softmax(z)_j
            grad_chunk = probs.mul_(-g_out)
            grad_chunk.scatter_add_(1, flat_index[start:stop], g_out)
            grad_logits[start:stop] = grad_chunk.to(logits.dtype)
        return grad_logits.view(logits.shape), None, None


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")


def selective_log_softmax(
    logits: Tensor, index: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """Log-probability of the chosen tokens, without a full ``[B, T, V]`` log-softmax.

    Equivalent to ``torch.log_softmax(logits, -1).gather(-1, index[..., None])[..., 0]`` but the
    ``B * T`` rows are processed ``chunk_size`` at a time, in forward and in backward, so the
    extra memory is one ``[chunk_size, V]`` block instead of a second copy of the logits.
    Differentiable with respect to ``logits`` (first order).

    Args:
        logits: Logits of shape ``[B, T, V]`` (any leading shape works; the last dim is ``V``).
        index: Chosen token ids of shape ``[B, T]`` (the leading shape of ``logits``).
        chunk_size: Number of rows (token positions) handled at once.

    Returns:
        Log-probabilities of shape ``[B, T]``; fp32 for half/bf16 logits, otherwise the logits' dtype.

    Raises:
        ValueError: If the shapes disagree or ``chunk_size < 1``.
    """
    if logits.dim() < 1 or tuple(index.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"index shape {tuple(index.shape)} must equal the logits shape without its vocabulary "
            f"dim; logits shape is {tuple(logits.shape)}"
        )
    _check_chunk_size(chunk_size)
    return _SelectiveLogSoftmax.apply(logits, index.long(), chunk_size)


@torch.no_grad()
def token_entropy(logits: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Entropy of the next-token distribution at every position (a metric; no gradient).

    Computed as ``logsumexp(z) - sum(softmax(z) * z)`` chunk by chunk over rows, which equals
    ``-sum(p * log p)`` without building ``log p`` for the whole batch.

    Args:
        logits: Logits of shape ``[B, T, V]`` (any leading shape; the last dim is ``V``).
        chunk_size: Number of rows (token positions) handled at once.

    Returns:
        Entropies in nats, shape ``[B, T]``; fp32 for half/bf16 logits, otherwise the logits' dtype.

    Raises:
        ValueError: If ``chunk_size < 1``.
    """
    _check_chunk_size(chunk_size)
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)  # [N, V]
    out_dtype = _compute_dtype(logits.dtype)
    out = torch.empty(flat_logits.shape[0], dtype=out_dtype, device=logits.device)  # [N]
    for start in range(0, flat_logits.shape[0], chunk_size):
        stop = start + chunk_size
        chunk = flat_logits[start:stop].to(out_dtype)  # [n, V]
        probs = torch.softmax(chunk, dim=-1)  # [n, V]
        out[start:stop] = torch.logsumexp(chunk, dim=-1) - (probs * chunk).sum(dim=-1)
    return out.view(logits.shape[:-1])


# --------------------------------------------------------------------------------------------------
# Completion log-probs, each prompt's forward shared by its group
# --------------------------------------------------------------------------------------------------


@dataclass
class PromptGroups:
    """A mini-batch split into distinct prompts and the completions that follow them.

    Attributes:
        group: ``[b]`` index of each row's prompt in ``prompt_ids``.
        prompt_ids: ``[u, Lp]`` the distinct prompts, left-padded.
        prompt_attention: ``[u, Lp]`` 0 on the left padding.
        prompt_len: ``[b]`` prompt length of each row.
        suffix_ids: ``[b, S]`` each row's tokens after its prompt, right-padded.
        suffix_attention: ``[b, S]`` 1 on the real tokens.
    """

    group: Tensor
    prompt_ids: Tensor
    prompt_attention: Tensor
    prompt_len: Tensor
    suffix_ids: Tensor
    suffix_attention: Tensor

    @property
    def saved_tokens(self) -> int:
        """Prompt token positions the shared pass does not compute (vs one forward per row)."""
        return int(self.prompt_len.sum()) - int(self.prompt_attention.sum())


def prompt_groups(mb: MiniBatch) -> PromptGroups | None:
    """Find the rows of ``mb`` that share a prompt (consecutive rows with the same prompt tokens).

    A row's prompt ends where its first generated token begins (the completion mask).

    Args:
        mb: The mini-batch.

    Returns:
        The grouping, or None when it cannot help: a row without any generated token, or no two
        rows sharing a prompt.
    """
    has_token = mb.mask.any(dim=1)  # [b]
    if not bool(has_token.all()):
        return None
    # mask column j predicts token first + j + 1, the first generated token sits right after the prompt
    prompt_len = mb.mask.int().argmax(dim=1) + mb.first + 1  # [b]
    rows, width = mb.ids.shape
    cols = torch.arange(width, device=mb.ids.device)
    in_prompt = cols.unsqueeze(0) < prompt_len.unsqueeze(1)  # [b, T]
    same = (prompt_len[1:] == prompt_len[:-1]) & (
        (mb.ids[1:] == mb.ids[:-1]) | ~in_prompt[1:]
    ).all(dim=1)  # [b-1]: row r+1 repeats row r's prompt
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same])  # [b]
    if bool(starts.all()):
        return None
    group = starts.long().cumsum(0) - 1  # [b]
    heads = starts.nonzero().squeeze(1)  # [u]
    head_len = prompt_len[heads]  # [u]
    lp = int(head_len.max())
    # Left-pad the distinct prompts: column c of the padded row reads prompt column c - (lp - L).
    src = cols[:lp].unsqueeze(0) - (lp - head_len).unsqueeze(1)  # [u, lp]
    prompt_attention = (src >= 0).long()
    prompt_ids = mb.ids[heads].gather(1, src.clamp(min=0)) * prompt_attention  # [u, lp]
    lengths = mb.attention.sum(dim=1)  # [b]
    s = int((lengths - prompt_len).max())
    tail = cols[:s].unsqueeze(0)  # [1, S]
    suffix_attention = (tail < (lengths - prompt_len).unsqueeze(1)).long()  # [b, S]
    suffix_ids = mb.ids.gather(1, (prompt_len.unsqueeze(1) + tail).clamp(max=width - 1)) * suffix_attention
    return PromptGroups(group, prompt_ids, prompt_attention, prompt_len, suffix_ids, suffix_attention)


def _shared_logits(model: Any, groups: PromptGroups) -> Tensor:
    """Logits predicting every suffix token, ``[b, S, V]``, from one forward per distinct prompt."""
    from transformers import DynamicCache

    keep_last = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    positions = (groups.prompt_attention.cumsum(-1) - 1).clamp(min=0)  # [u, Lp]
    cache = DynamicCache(config=model.config)
    head = model(
        input_ids=groups.prompt_ids, attention_mask=groups.prompt_attention, position_ids=positions,
        past_key_values=cache, use_cache=True, **keep_last,
    ).logits[:, -1:]  # [u, 1, V]: predicts each prompt's first completion token  # fmt: skip
    cache.batch_select_indices(groups.group)  # [u, ...] -> [b, ...]; differentiable indexing
    attention = torch.cat([groups.prompt_attention[groups.group], groups.suffix_attention], dim=1)  # [b, Lp + S]
    suffix_positions = groups.prompt_len.unsqueeze(1) + torch.arange(
        groups.suffix_ids.shape[1], device=groups.suffix_ids.device
    )  # [b, S]
    tail = model(
        input_ids=groups.suffix_ids, attention_mask=attention, position_ids=suffix_positions,
        past_key_values=cache, use_cache=True,
    ).logits[:, :-1]  # [b, S - 1, V]: suffix token k predicts token k + 1  # fmt: skip
    return torch.cat([head[groups.group], tail], dim=1)  # [b, S, V]


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature``: the distribution the sampler drew from (``decoding.filter_logits``).

    Scoring the samples of ``softmax(z / T)`` with ``softmax(z)`` would make the policy gradient
    ``A * grad log pi_1(y)`` for ``y ~ pi_T``, a biased estimate of the sampled policy's gradient;
    TRL divides by the temperature here as well. T = 1 skips the copy.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score sampled tokens, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def completion_logps(
    model: Any, mb: MiniBatch, *, entropy: bool = False, share_prompt: bool = True, temperature: float = 1.0
) -> tuple[Tensor, Tensor | None]:
    """Log-probability of every token after the prompt, in the mini-batch's completion window.

    Args:
        model: A causal LM (plain or PEFT) taking ``past_key_values``/``position_ids``.
        mb: The mini-batch (rows prompt-major, see :func:`~llm_gym.algorithms.generation.mini_batches`).
        entropy: Also return the per-token entropy of the policy (no gradient).
        share_prompt: Run each distinct prompt once and reuse its KV cache across its group; off
            (or when :func:`prompt_groups` finds nothing to share) every row runs in full.
        temperature: The sampling temperature: the logits are divided by it before the softmax,
            so the tokens are scored under the distribution they were sampled from (top-k/top-p
            truncation is not applied, as in TRL). Entropies are of the same distribution.

    Raises:
        ValueError: On a temperature <= 0.

    Returns:
        ``(logp, entropy)``, both ``[b, T - 1 - first]`` aligned with ``mb.mask`` (column ``j``
        scores token ``first + j + 1``); values outside the completions are meaningless (the loss
        masks them); ``entropy`` is None unless asked for.
    """
    groups = prompt_groups(mb) if share_prompt else None
    if groups is None:
        keep = {"logits_to_keep": mb.ids.shape[1] - mb.first} if accepts_logits_to_keep(model) else {}
        logits = model(input_ids=mb.ids, attention_mask=mb.attention, use_cache=False, **keep).logits
        logits = logits[:, mb.first - mb.ids.shape[1] : -1]  # [b, t, V]: position t predicts token t + 1
        logits = _scaled(logits, temperature)
        logp = selective_log_softmax(logits, mb.ids[:, mb.first + 1 :])  # [b, t]
        return logp, (token_entropy(logits.detach()) if entropy else None)
    logits = _scaled(_shared_logits(model, groups), temperature)  # [b, S, V]
    logp = selective_log_softmax(logits, groups.suffix_ids)  # [b, S]
    ent = token_entropy(logits.detach()) if entropy else None
    # Back to the window layout: window column j scores token first + j + 1 = suffix index
    # first + j + 1 - prompt_len.
    window = mb.mask.shape[1]
    k = torch.arange(window, device=logp.device).unsqueeze(0) + mb.first + 1 - groups.prompt_len.unsqueeze(1)
    inside = (k >= 0) & (k < logp.shape[1])  # [b, t]
    index = k.clamp(0, logp.shape[1] - 1)
    logp = torch.where(inside, logp.gather(1, index), torch.zeros((), dtype=logp.dtype, device=logp.device))
    if ent is not None:
        ent = torch.where(inside, ent.gather(1, index), torch.zeros((), dtype=ent.dtype, device=ent.device))
    return logp, ent
