"""One batched decoding run for several LoRA adapters of one shared base: a population's generation.

Decoding a small model is bound by reading its weights (and KV cache) once per step, not by the
arithmetic, so the agents of a population, which share one frozen base, should share those reads:
every agent's rows go through the base weights in one matmul per layer, and only the LoRA delta
``scale_i * (x A_i^T) B_i^T`` is computed per agent, on that agent's rows (two small matmuls per agent
and layer, added in place into the base output). :func:`row_adapters` swaps every PEFT LoRA
``Linear`` for a :class:`RowLoraLinear` doing that; :func:`decode_population` is the decoding loop
of :mod:`~llm_gym.algorithms.rollout.decoding` over the rows of every agent at once:

* rows are agent-major (agent 0's rows first), then prompt-major (a prompt's ``G_i`` rows together), and
  stay in that order when finished rows leave the batch, so each agent's rows are one contiguous run
  (a :class:`RowPlan` of ``(adapter, start, end)`` the LoRA layers read);
* the prefill runs every agent's prompts in one forward (each prompt row with its agent's adapter: LoRA
  on the attention projections changes the prompt's keys and values), then repeats each prompt's cache
  ``G_i`` times;
* sampling settings are per agent (temperature, top-k, top-p, greedy, group size, token budget): each
  agent's rows are sampled with its own :func:`~llm_gym.algorithms.rollout.decoding.next_tokens` call and
  leave the batch at their own budget.

With one adapter the merged-weight path of :class:`~llm_gym.algorithms.rollout.hf.HFGenerationBackend`
is faster (no LoRA product at all) and is what a single agent uses. Decoding only: no gradients, no
LoRA dropout (the model is in eval mode while generating).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llm_gym.algorithms.plumbing.kv_cache import preallocate
from llm_gym.algorithms.plumbing.lora_swap import _lora_layers, _swapped
from llm_gym.algorithms.rollout.backend import SamplingConfig
from llm_gym.algorithms.rollout.decoding import _sdpa_full_attention, accepts_logits_to_keep, next_tokens

__all__ = [
    "STACK_MAX_WEIGHTS",
    "DecodeRequest",
    "RowLoraLinear",
    "RowPlan",
    "decode_population",
    "row_adapters",
    "supports_row_adapters",
]

logger = logging.getLogger(__name__)


@dataclass
class RowPlan:
    """Which rows of the current batch belong to which adapter, read by every :class:`RowLoraLinear`.

    Attributes:
        segments: ``(slot, start, end)`` per adapter with rows: batch rows ``start:end`` use the adapter
            at index ``slot`` of the adapter list given to :func:`row_adapters`.
    """

    segments: list[tuple[int, int, int]] = field(default_factory=list)
    _masks: dict[tuple[int, int, int, torch.dtype, torch.device], Tensor] = field(default_factory=dict, repr=False)

    def set_counts(self, counts: Sequence[int], adapter_of: Sequence[int]) -> None:
        """Set the runs from the rows of each request, in request order (rows are request-major).

        Args:
            counts: Live rows per request.
            adapter_of: Per request, the slot of its adapter.
        """
        self.segments, start = [], 0
        for request, count in enumerate(counts):
            if count:
                self.segments.append((adapter_of[request], start, start + count))
                start += count
        self._masks.clear()

    def block_mask(self, per_row: int, slots: int, rank: int, like: Tensor) -> Tensor:
        """``[rows * per_row, slots * rank]``: 1 where a token's row uses the adapter of that rank block, else 0.

        Built once per plan (and token count, rank) and shared by every layer of that shape.
        """
        key = (per_row, slots, rank, like.dtype, like.device)
        mask = self._masks.get(key)
        if mask is None:
            rows = self.segments[-1][2] if self.segments else 0
            mask = like.new_zeros((rows * per_row, slots * rank))
            for slot, start, end in self.segments:
                mask[start * per_row : end * per_row, slot * rank : (slot + 1) * rank] = 1
            self._masks[key] = mask
        return mask


STACK_MAX_WEIGHTS = 1 << 16
"""Layers with at most this many base weights run every adapter in one stacked product (see
:class:`RowLoraLinear`): so small that each extra op's fixed cost (microseconds on CPU) outweighs the
arithmetic spent on other adapters' blocks (e.g. the ``tiny`` preset's 64 x 64 ... 64 x 256 layers;
the ``small`` preset's 512 x 512 layers use per-adapter runs)."""


class RowLoraLinear(torch.nn.Module):
    """A LoRA ``Linear`` whose batch rows each use their own adapter (:class:`RowPlan`).

    ``out = base(x)`` for every row at once, then for each adapter's run of rows
    ``out[rows] += scale * (x[rows] A^T) B^T`` with one ``addmm_`` (the adapter weights are the
    layer's own, not copies). Rows whose adapter does not adapt this layer get the base.

    Small layers (<= :data:`STACK_MAX_WEIGHTS` base weights) whose adapters all have one rank and the
    base's dtype instead compute ``(x [A_1; ...; A_S]^T * mask) [s_1 B_1, ..., s_S B_S]^T`` for all rows
    at once: three ops whatever the number of adapters, the mask keeping each row's own rank block
    (the stacked copies are made once per swap, a few KiB for such layers).

    Args:
        layer: A plain PEFT LoRA ``Linear`` (no DoRA, no LoRA bias).
        adapters: Adapter names by slot.
        plan: The shared row plan.
    """

    def __init__(self, layer: Any, adapters: Sequence[str], plan: RowPlan) -> None:
        super().__init__()
        self.base_layer = layer.base_layer
        self.plan = plan
        self.loras: list[tuple[Tensor, Tensor, float] | None] = [
            (layer.lora_A[a].weight, layer.lora_B[a].weight.t(), float(layer.scaling[a])) if a in layer.lora_A else None
            for a in adapters
        ]  # (A [r, in], B^T [r, out] as a view, scale)
        self.stacked: tuple[Tensor, Tensor, int] | None = None
        weight = self.base_layer.weight
        present = [lora for lora in self.loras if lora is not None]
        if (
            len(adapters) > 1 and len(present) == len(adapters) and weight.numel() <= STACK_MAX_WEIGHTS
            and len({a.shape[0] for a, _, _ in present}) == 1 and all(a.dtype == weight.dtype for a, _, _ in present)
        ):  # fmt: skip
            with torch.no_grad():
                self.stacked = (torch.cat([a for a, _, _ in present]),  # [S*r, in]
                                torch.cat([bt * scale for _, bt, scale in present]),  # [S*r, out]
                                present[0][0].shape[0])  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        """``base(x)`` plus each row's own adapter product; ``x`` is ``[B, T, in]`` (or ``[B, in]``)."""
        out = self.base_layer(x)  # [B, T, out]
        rows = x.shape[0]
        flat_x = x.reshape(-1, x.shape[-1])  # [B*T, in], row-major: row b holds tokens b*T:(b+1)*T
        flat = out.view(-1, out.shape[-1])  # [B*T, out], a view: in-place adds land in out
        per_row = flat_x.shape[0] // rows  # T
        if self.stacked is not None:
            lora_a, lora_bt, rank = self.stacked
            u = torch.nn.functional.linear(flat_x, lora_a)  # [B*T, S*r]
            u.mul_(self.plan.block_mask(per_row, len(self.loras), rank, u))  # each token keeps its row's block
            flat.addmm_(u, lora_bt)
            return out
        for slot, start, end in self.plan.segments:
            lora = self.loras[slot]
            if lora is None:
                continue
            lora_a, lora_bt, scale = lora
            xs, target = flat_x[start * per_row : end * per_row], flat[start * per_row : end * per_row]
            if lora_a.dtype != x.dtype:
                # PEFT's arithmetic for fp32 adapters over a bf16/fp16 base: product and sum in the
                # adapter dtype, one cast back.
                u = torch.nn.functional.linear(xs.to(lora_a.dtype), lora_a)  # [n, r]
                target.copy_((target.to(lora_a.dtype) + (u @ lora_bt) * scale).to(out.dtype))
                continue
            u = torch.nn.functional.linear(xs, lora_a)  # [n, r]
            target.addmm_(u, lora_bt, alpha=scale)
        return out


def _plain_lora(layer: Any, adapters: Sequence[str]) -> bool:
    return isinstance(layer.base_layer, torch.nn.Linear) and not any(
        layer.use_dora.get(a, False) or getattr(layer, "lora_bias", {}).get(a, False) for a in adapters
    )


def supports_row_adapters(model: Any, adapters: Sequence[str]) -> bool:
    """Whether :func:`row_adapters` covers every adapter layer of ``model`` for ``adapters``.

    Args:
        model: A PEFT model.
        adapters: The adapter names to decode with.

    Returns:
        True when the model has LoRA ``Linear`` layers, only those (no DoRA, LoRA bias, other tuner
        types or ``modules_to_save`` wrappers), and every adapter name is one of its adapters.
    """
    found, complete = _lora_layers(model)
    names = set(getattr(model, "peft_config", {}) or {})
    return (
        bool(found) and complete and all(a in names for a in adapters)
        and all(_plain_lora(layer, adapters) for _, _, layer in found)
    )  # fmt: skip


@contextlib.contextmanager
def row_adapters(model: Any, adapters: Sequence[str]) -> Iterator[RowPlan]:
    """Temporarily replace every LoRA ``Linear`` of ``model`` by a :class:`RowLoraLinear` over ``adapters``.

    Args:
        model: A PEFT model for which :func:`supports_row_adapters` is True.
        adapters: Adapter names by slot.

    Yields:
        The :class:`RowPlan` to fill before each forward; the original layers are back on exit, even on error.

    Raises:
        ValueError: When the model holds layers the swap cannot cover.
    """
    if not supports_row_adapters(model, adapters):
        raise ValueError(
            f"per-row adapters need plain LoRA Linear layers holding every adapter of {list(adapters)}; "
            "generate agent by agent instead (agent.get_action)"
        )
    plan = RowPlan()
    with _swapped(_lora_layers(model)[0], lambda layer: RowLoraLinear(layer, adapters, plan)):
        yield plan


@dataclass(frozen=True)
class DecodeRequest:
    """One agent's part of a population decode.

    Attributes:
        adapter: The agent's adapter name in the shared PEFT model.
        input_ids: Left-padded prompts ``[P_i, L_i]``.
        attention_mask: ``[P_i, L_i]``, 0 on the padding.
        sampling: The agent's decoding settings (group size, budget, temperature, top-k, top-p, greedy).
    """

    adapter: str
    input_ids: Tensor
    attention_mask: Tensor
    sampling: SamplingConfig


def _left_pad_to(ids: Tensor, mask: Tensor, width: int, pad: int) -> tuple[Tensor, Tensor]:
    extra = width - ids.shape[1]
    if extra == 0:
        return ids, mask
    return (torch.cat([ids.new_full((ids.shape[0], extra), pad), ids], dim=1),
            torch.cat([mask.new_zeros((mask.shape[0], extra)), mask], dim=1))  # fmt: skip


def decode_population(
    model: Any,
    requests: Sequence[DecodeRequest],
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    preallocate_cache: bool = True,
    return_logprobs: bool = False,
    generator: torch.Generator | None = None,
) -> list[Tensor] | tuple[list[Tensor], list[Tensor]]:
    """Generate every request's completions in one KV-cached decoding loop over all their rows.

    The caller sets eval mode and ``torch.no_grad()``. A row stops at its first EOS (kept) or at its
    agent's budget; finished rows leave the batch at once.

    Args:
        model: The shared PEFT model holding every request's adapter.
        requests: One per agent (adapter names may repeat: e.g. two prompt batches of one agent).
        eos_token_ids: Ids that end a completion.
        pad_token_id: Written after a row's end.
        preallocate_cache: KV cache buffers sized once (:mod:`~llm_gym.algorithms.plumbing.kv_cache`).
        return_logprobs: Also return, per request, the log-probability of each generated token under the
            raw (temperature 1, unfiltered) next-token distribution of the agent's model, ``[P_i*G_i, C_i]``
            (0 after the row's end): what the GRPO update computes for the same tokens.
        generator: Sampling RNG (None: torch's global RNG).

    Returns:
        Per request the generated ids ``[P_i * G_i, C_i]`` (rows prompt-major, ``C_i`` up to its agent's
        budget: the last step at which one of its rows was still live); with ``return_logprobs`` the pair
        ``(ids, logprobs)``.

    Raises:
        ValueError: On no requests, a budget or group size < 1, or a model :func:`row_adapters` cannot cover.
    """
    if not requests:
        raise ValueError("decode_population needs at least one request")
    for r in requests:
        if r.sampling.max_new_tokens < 1 or r.sampling.group_size < 1:
            raise ValueError(f"adapter {r.adapter!r}: max_new_tokens and group_size must be >= 1, got "
                             f"{r.sampling.max_new_tokens} and {r.sampling.group_size}")  # fmt: skip
    from transformers import DynamicCache

    device = requests[0].input_ids.device
    adapters = list(dict.fromkeys(r.adapter for r in requests))
    slots = len(requests)  # one slot per request: a request's rows are one run
    width = max(r.input_ids.shape[1] for r in requests)
    padded = [_left_pad_to(r.input_ids, r.attention_mask, width, int(pad_token_id)) for r in requests]
    input_ids = torch.cat([p[0] for p in padded]).to(device)  # [R, W], request-major
    attention = torch.cat([p[1] for p in padded]).to(device)  # [R, W]
    prompts = [r.input_ids.shape[0] for r in requests]
    groups = [r.sampling.group_size for r in requests]
    budgets = [r.sampling.max_new_tokens for r in requests]
    steps = max(budgets)
    eos = torch.tensor(sorted({int(e) for e in eos_token_ids}), dtype=torch.long, device=device)
    with row_adapters(model, adapters) as plan:
        adapter_slot = [adapters.index(r.adapter) for r in requests]  # request -> its adapter's slot
        plan.set_counts(prompts, adapter_slot)
        positions = (attention.long().cumsum(-1) - 1).masked_fill(attention == 0, 0)  # [R, W]
        cache = DynamicCache(config=model.config)
        last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                       past_key_values=cache, use_cache=True, **last_only).logits[:, -1].float()  # [R, V]  # fmt: skip
        # Each prompt row becomes G_i rows (its agent's group), keeping the request-major order.
        repeats = torch.tensor([g for p, g in zip(prompts, groups, strict=True) for _ in range(p)], device=device)
        expand = torch.repeat_interleave(torch.arange(input_ids.shape[0], device=device), repeats)  # [N]
        if preallocate_cache:
            # Size the buffers while the cache holds one row per prompt: the expansion below then writes
            # straight into [N, H, capacity, D] buffers, with no [N, H, W, D] copy alive at the same time
            # (at 8 agents x 32 rows of the small preset that copy alone was ~370 MB).
            preallocate(cache, width + steps)
        cache.batch_select_indices(expand)
        logits, attention, position = logits[expand], attention[expand], positions[expand, -1:]
        counts = [p * g for p, g in zip(prompts, groups, strict=True)]
        rows = sum(counts)
        row_slot = torch.repeat_interleave(torch.arange(slots, device=device), torch.tensor(counts, device=device))
        row_budget = torch.tensor(budgets, device=device)[row_slot]  # [N]
        plan.set_counts(counts, adapter_slot)
        own_mask = _sdpa_full_attention(model)
        out = torch.full((rows, steps), int(pad_token_id), dtype=torch.long, device=device)  # [N, S]
        logps = torch.zeros((rows, steps), dtype=torch.float32, device=device) if return_logprobs else None
        lengths = [0] * slots  # per request: the last step with a live row
        live = torch.arange(rows, device=device)  # original row of each batch row
        for step in range(steps):
            token = _sample(logits, plan_counts=counts, requests=requests, generator=generator)  # [n]
            out[live, step] = token
            if logps is not None:
                logps[live, step] = logits.log_softmax(-1).gather(1, token[:, None]).squeeze(1)
            for slot, count in enumerate(counts):
                if count:
                    lengths[slot] = step + 1
            done = torch.isin(token, eos) | (row_budget[live] <= step + 1)  # [n]
            if step == steps - 1:
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)  # [n'], sorted: the order (and runs) survive
                if keep.numel() == 0:
                    break
                live, token, position, attention = live[keep], token[keep], position[keep], attention[keep]
                cache.batch_select_indices(keep)
                counts = torch.bincount(row_slot[live], minlength=slots).tolist()  # note: a CPU sync per drop
                plan.set_counts(counts, adapter_slot)
            position = position + 1
            attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=1)
            mask = attention.bool()[:, None, None, :] if own_mask else attention
            logits = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position,
                           past_key_values=cache, use_cache=True, **last_only).logits[:, -1].float()  # fmt: skip
    starts = [0]
    for p, g in zip(prompts, groups, strict=True):
        starts.append(starts[-1] + p * g)
    ids = [out[starts[i] : starts[i + 1], : lengths[i]] for i in range(slots)]
    if logps is None:
        return ids
    return ids, [logps[starts[i] : starts[i + 1], : lengths[i]] for i in range(slots)]


def _sample(
    logits: Tensor, *, plan_counts: Sequence[int], requests: Sequence[DecodeRequest], generator: torch.Generator | None
) -> Tensor:
    """Each request's live rows (one run each, in request order) sampled with that request's settings."""
    picks, start = [], 0
    for count, request in zip(plan_counts, requests, strict=True):
        if not count:
            continue
        s = request.sampling
        picks.append(next_tokens(logits[start : start + count], greedy=s.greedy, temperature=s.temperature,
                                 top_k=s.top_k, top_p=s.top_p, generator=generator))  # fmt: skip
        start += count
    return picks[0] if len(picks) == 1 else torch.cat(picks)
