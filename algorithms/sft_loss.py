"""The SFT loss: next-token cross-entropy on the labelled (completion) tokens, computed cheaply.

Two savings, each the same loss as the plain full pass to float rounding:

- the output head runs only from the first position that predicts a labelled token
  (``logits_to_keep``): prompt positions need hidden states, not logits;
- the prefix every row of the batch shares (system prompt and chat-template tokens: 42 of the
  ~170 tokens of a demo Countdown row) runs once, batch 1, and its KV cache is broadcast to the
  batch; gradients from every row flow back through the one prefix pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "completion_loss", "labelled_loss", "shared_prefix_length"]

IGNORE_INDEX = -100
"""Label of positions that do not count in the loss (prompt and padding)."""


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (completion) positions.

    Args:
        logits: ``[B, L, V]`` model outputs.
        labels: ``[B, L]`` target ids, -100 where not scored.

    Returns:
        The scalar loss.
    """
    # position t predicts token t+1: drop the last logit and the first label
    shifted_logits = logits[:, :-1, :].float()  # [B, L-1, V]
    shifted_labels = labels[:, 1:]  # [B, L-1]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Number of leading positions where every row holds the same (attended) token.

    Args:
        input_ids: ``[B, L]`` token ids.
        attention_mask: ``[B, L]``, 1 on real tokens.

    Returns:
        The length of the common prefix (0 when the first tokens differ).
    """
    same = ((input_ids == input_ids[:1]) & (attention_mask == 1)).all(dim=0)  # [L]
    return int(same.long().cumprod(dim=0).sum())


def labelled_loss(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], head_window: bool = True, share_prefix: bool = True
) -> torch.Tensor:
    """:func:`completion_loss` of ``model`` on ``batch``, with the head and the shared prefix run once.

    With ``head_window`` the head runs from the first position that predicts a labelled token to
    the end (``logits_to_keep``, ~15 % less work per SFT step on the tiny model). With
    ``share_prefix`` (and ``head_window``) the rows' common prefix before that position is
    forwarded once and its KV cache broadcast to every row (a further ~25 % on demo Countdown
    rows). Both give the plain pass's loss and gradients to float rounding.

    Args:
        model: A causal LM (plain or PEFT); ``head_window`` needs its ``forward`` to take
            ``logits_to_keep``, ``share_prefix`` a Hugging Face KV cache (``past_key_values``).
        batch: ``input_ids``, ``attention_mask`` and ``labels`` (``[B, L]``, -100 where not scored),
            right-padded as :func:`~llm_gym.algorithms.sft.collate_rows` builds them.
        head_window: False computes every position's logits (models without ``logits_to_keep``).
        share_prefix: False forwards every row in full.

    Returns:
        The scalar loss.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    scored = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
    if not head_window or scored.numel() == 0:
        logits = model(input_ids=ids, attention_mask=mask).logits  # [B, L, V]
        return completion_loss(logits, labels)
    first = int(scored[0])  # position `first` predicts the first labelled token, at first + 1
    keep = labels.shape[1] - first
    prefix = min(shared_prefix_length(ids, mask), first) if share_prefix and ids.shape[0] > 1 else 0
    if prefix == 0:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        return completion_loss(logits, labels[:, first:])  # logits[:, j] predicts labels[:, first + j + 1]
    from transformers import DynamicCache

    cache: Any = DynamicCache(config=model.config)
    model(input_ids=ids[:1, :prefix], past_key_values=cache, use_cache=True, logits_to_keep=1)  # [1, prefix]
    cache.batch_select_indices(torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device))  # [1] -> [B]
    logits = model(input_ids=ids[:, prefix:], attention_mask=mask, past_key_values=cache, use_cache=True,
                   logits_to_keep=keep).logits  # fmt: skip
    return completion_loss(logits, labels[:, first:])
