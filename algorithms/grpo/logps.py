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

from llm_gym.algorithms.grpo.loss import selective_log_softmax, token_entropy
from llm_gym.algorithms.rollout.completions import MiniBatch
from llm_gym.algorithms.rollout.decoding import accepts_logits_to_keep

__all__ = ["PromptGroups", "completion_logps", "prompt_groups"]


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


def completion_logps(
    model: Any, mb: MiniBatch, *, entropy: bool = False, share_prompt: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Log-probability of every token after the prompt, in the mini-batch's completion window.

    Args:
        model: A causal LM (plain or PEFT) taking ``past_key_values``/``position_ids``.
        mb: The mini-batch (rows prompt-major, see :func:`~llm_gym.algorithms.generation.mini_batches`).
        entropy: Also return the per-token entropy of the policy (no gradient).
        share_prompt: Run each distinct prompt once and reuse its KV cache across its group; off
            (or when :func:`prompt_groups` finds nothing to share) every row runs in full.

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
        logp = selective_log_softmax(logits, mb.ids[:, mb.first + 1 :])  # [b, t]
        return logp, (token_entropy(logits.detach()) if entropy else None)
    logits = _shared_logits(model, groups)  # [b, S, V]
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
