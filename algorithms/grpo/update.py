"""One GRPO update of an agent, top to bottom: plan -> frozen log-probs -> accumulated epochs -> metrics.

:func:`learn` is what :meth:`GRPO.learn` runs. Gradients are accumulated over all mini-batches
(``batch_size`` sequences each), each weighted by its share of the full batch (the loss variant's
:attr:`~llm_gym.algorithms.grpo.loss.LossVariant.batch_share`), so the result equals the full-batch
loss, and the optimizer steps once per update epoch. With ``update_epochs == 1`` the samples are
exactly on-policy and no old-log-prob pass is spent (the ratio is 1); with more epochs old log-probs
are computed once up front. A non-finite loss or gradient norm skips that epoch's step with a warning.

The rows may be single-turn completions or multi-turn trajectories: the action mask says which
tokens the model generated (holes where the environment's tokens sit), and only those are trained.

Data-parallel (several processes, :mod:`~llm_gym.algorithms.run.distributed`): each process holds
its shard of the batch's prompts (whole groups, so advantages stay local). The normalisers (sequences
and tokens of the batch) are summed over the processes first, so each process's loss is its share
of the global-batch loss; the LoRA gradients are then summed over the processes before clipping and
the optimizer step, which every process takes alike. The result is the one-process update on the
global batch, up to float summation order.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llm_gym.algorithms.grpo.logps import completion_logps
from llm_gym.algorithms.grpo.loss import (
    LOSS_VARIANTS,
    group_advantages,
    grpo_loss,
    truncated_importance_weights,
)
from llm_gym.algorithms.plumbing.distributed import all_reduce_grads, all_reduce_sum, world_size
from llm_gym.algorithms.plumbing.lora_swap import base_model_only, fused_lora
from llm_gym.algorithms.rollout.completions import MiniBatch, mini_batches, pack_completions, select_rows

__all__ = ["UpdatePlan", "frozen_logps", "learn", "policy_logps"]


@dataclass
class UpdatePlan:
    """What one update trains on, worked out before any gradient.

    Attributes:
        batches: The mini-batches of the rows trained on (on the agent's device).
        weights: Each mini-batch's share of the full-batch loss.
        advantages: Each mini-batch's ``[b]`` advantages.
        ref: Reference log-probs per mini-batch (None when ``beta == 0``).
        old: Old-policy log-probs per mini-batch (None when ``update_epochs == 1``).
        metrics: Advantage metrics, completion length and the trained fraction of the rows.
        global_rows: Rows trained on, summed over the data-parallel processes.
        sampling: The generation engine's log-probs per mini-batch (``[b, t]`` like its mask), for
            the importance-sampling correction; None per mini-batch when it is off or the backend
            returned none.
    """

    batches: list[MiniBatch]
    weights: list[float]
    advantages: list[Tensor]
    ref: list[Tensor | None]
    old: list[Tensor | None]
    metrics: dict[str, float]
    global_rows: int = 0
    sampling: list[Tensor | None] = field(default_factory=list)


@dataclass
class EpochTotals:
    """Sums over the epochs of one update, turned into metrics by :func:`_metrics`."""

    sums: dict[str, float] = field(default_factory=dict)
    grad_norms: list[float] = field(default_factory=list)
    skipped: int = 0
    entropy_sum: float = 0.0
    entropy_tokens: int = 0


def policy_logps(agent: Any, mb: MiniBatch, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and optionally entropies) of ``mb``'s tokens under the agent's current model.

    Scored at the agent's sampling temperature (its ``temperature`` gene), like the old-policy and
    reference log-probs (:func:`frozen_logps` goes through here), so the ratio and the KL compare
    the same tempered distributions.
    """
    return completion_logps(
        agent.model, mb, entropy=entropy, share_prompt=agent.share_prompt_forward, temperature=agent.hps.temperature
    )


@torch.no_grad()
def frozen_logps(agent: Any, batches: Sequence[MiniBatch], reference: bool) -> list[Tensor]:
    """Log-probs without gradient: of the reference (adapters off) or of the policy as it is now (old).

    Args:
        agent: The GRPO agent.
        batches: The mini-batches.
        reference: True for the reference policy (the base model with adapters disabled).

    Returns:
        One ``[b, t]`` tensor per mini-batch.
    """
    was_training = agent.model.training
    agent.model.eval()
    try:
        if reference:
            with base_model_only(agent.model):  # = disable_adapter(), without PEFT's wrappers
                return [agent._logps(mb)[0] for mb in batches]
        return [agent._logps(mb)[0] for mb in batches]
    finally:
        agent.model.train(was_training)


def _packed_sampling_logps(agent: Any, completion_ids: Sequence[Tensor], action_masks: Sequence[Tensor],
                           width: int) -> Tensor | None:
    """The engine's sampled-token log-probs of these completions as ``[B, width]`` rows (like the packed mask).

    None unless the importance-sampling correction is on and the backend returned log-probs for
    every prompt's completions (:meth:`GRPO.remember_sampling_logps`).
    """
    if not agent.hps.vllm_importance_sampling_correction:
        return None
    per_prompt = agent.sampling_logps_for(completion_ids)
    if per_prompt is None:
        return None
    rows = [r for lp, m in zip(per_prompt, action_masks, strict=True) if tuple(lp.shape) == tuple(m.shape) for r in lp]
    if len(rows) != sum(int(m.shape[0]) for m in action_masks):
        return None  # a prompt's log-probs do not match its mask: no correction rather than a wrong one
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for b, row in enumerate(rows):
        out[b, : row.shape[0]] = row.float().cpu()
    return None if bool(torch.isnan(out).any()) else out  # NaN: a completion came back without log-probs


def _plan(agent: Any, experiences: tuple[Sequence[Tensor], Sequence[Tensor], Tensor]) -> UpdatePlan:
    completion_ids, action_masks, rewards = experiences
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 2 or rewards.shape[0] != len(completion_ids):
        raise ValueError(
            f"rewards must be [P, G] with P = {len(completion_ids)} prompts, got shape {tuple(rewards.shape)}"
        )
    hps = agent.hps
    advantages, metrics = group_advantages(rewards, scale=hps.scale_rewards)  # [P, G]
    advantages = advantages.reshape(-1)  # [B], prompt-major like the packed rows
    packed = pack_completions(completion_ids, action_masks, rewards.shape[1], agent.pad_token_id)
    sampling = _packed_sampling_logps(agent, completion_ids, action_masks, packed.mask.shape[1])  # [B, T-1]
    # Normalisers count every sequence, trained on or not, so dropping rows below changes nothing.
    local_seqs, local_tokens = packed.ids.shape[0], int(packed.mask.sum())
    metrics["completion/length_mean"] = float(packed.mask.sum(dim=1).float().mean())
    if hps.beta == 0:
        # With no KL term a zero advantage means a zero gradient: skip those rows' forward and
        # backward (groups whose rewards all tie). Their loss and clip fraction are exactly 0.
        trained = advantages != 0  # [B]
        packed, advantages = select_rows(packed, trained), advantages[trained]
        sampling = sampling[trained] if sampling is not None else None
    metrics["grpo/trained_fraction"] = packed.ids.shape[0] / local_seqs
    # Data-parallel: the global batch's normalisers (one collective; plain values in one process).
    seqs, tokens, rows = all_reduce_sum([local_seqs, local_tokens, packed.ids.shape[0]])
    total_seqs, total_tokens = int(seqs), max(int(tokens), 1)
    batches = mini_batches(packed, hps.batch_size, agent.device) if packed.ids.shape[0] else []
    share = LOSS_VARIANTS[hps.loss_type].batch_share
    weights = [share(mb.ids.shape[0], mb.mask.sum().item(), total_seqs, total_tokens) for mb in batches]
    advs = [advantages[mb.rows].to(agent.device) for mb in batches]
    ref = frozen_logps(agent, batches, reference=True) if hps.beta > 0 else [None] * len(batches)
    old = frozen_logps(agent, batches, reference=False) if hps.update_epochs > 1 else [None] * len(batches)
    engine: list[Tensor | None] = [None] * len(batches)
    if sampling is not None:
        engine = [sampling[mb.rows, mb.first : mb.first + mb.mask.shape[1]].to(agent.device) for mb in batches]
    return UpdatePlan(batches, weights, advs, ref, old, metrics, global_rows=int(rows), sampling=engine)


def _accumulate(agent: Any, plan: UpdatePlan, epoch: int, totals: EpochTotals) -> bool:
    """Forward and backward every mini-batch of one epoch; False at the first non-finite loss."""
    hps = agent.hps
    sampling = plan.sampling or [None] * len(plan.batches)
    for mb, weight, adv, ref_logp, old_logp, engine_logp in zip(
        plan.batches, plan.weights, plan.advantages, plan.ref, plan.old, sampling, strict=True
    ):
        logp, ent = agent._logps(mb, entropy=epoch == 0)
        is_weights = None
        if engine_logp is not None:  # TIS: the trainer's log-probs of the policy that sampled vs the engine's
            sampled_by = old_logp if old_logp is not None else logp.detach()
            is_weights = truncated_importance_weights(sampled_by, engine_logp, mb.mask, hps.vllm_importance_sampling_cap)
        out = grpo_loss(
            logp, old_logp, ref_logp, adv, mb.mask, beta=hps.beta, clip_low=hps.clip_low,
            clip_high=hps.clip_high, loss_type=hps.loss_type, max_completion_length=hps.max_output_tokens,
            is_weights=is_weights,
        )  # fmt: skip
        if not torch.isfinite(out.loss):
            return False
        (out.loss * weight).backward()
        for key, value in {"loss": out.loss.item(), **out.metrics}.items():
            totals.sums[key] = totals.sums.get(key, 0.0) + value * weight / hps.update_epochs
        if ent is not None:
            totals.entropy_sum += float(ent[mb.mask].sum())
            totals.entropy_tokens += int(mb.mask.sum())
    return True


def _run_epochs(agent: Any, plan: UpdatePlan) -> EpochTotals:
    """The optimizer steps of one update (one per epoch), skipping an epoch with a non-finite loss or norm."""
    totals = EpochTotals()
    params = agent._adapter_params()
    agent.model.train()
    fused = fused_lora(agent.model) if agent.fuse_lora else contextlib.nullcontext()
    with fused:  # the LoRA layers as in-place addmm for forward and backward (lora_swap)
        for epoch in range(agent.hps.update_epochs):
            agent.optimizer.zero_grad(set_to_none=True)
            finite = _accumulate(agent, plan, epoch, totals)
            if world_size() > 1:
                # Every process skips the epoch when one of them saw a non-finite loss, else they
                # would diverge; then the global-batch gradient (each loss already carries its share).
                finite = all_reduce_sum([0.0 if finite else 1.0])[0] == 0
                if finite and plan.global_rows:
                    all_reduce_grads(params)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, agent.hps.max_grad_norm)) if finite else math.nan
            if not finite or not math.isfinite(grad_norm):
                totals.skipped += 1
                agent.optimizer.zero_grad(set_to_none=True)
                warnings.warn(
                    f"GRPO update skipped at step {agent.steps} (epoch {epoch}): non-finite "
                    f"{'loss' if not finite else 'gradient norm'}; counted in grpo/skipped_updates",
                    RuntimeWarning,
                    stacklevel=4,
                )
                continue
            totals.grad_norms.append(grad_norm)
            agent.optimizer.step()
    agent.optimizer.zero_grad(set_to_none=True)
    return totals


def _metrics(agent: Any, plan: UpdatePlan, totals: EpochTotals) -> dict[str, float]:
    # The losses are full-batch objectives (skipped rows add exactly 0); the other per-token
    # metrics (clip fractions, ratio, KL) describe the rows actually trained on.
    kept = sum(plan.weights)
    metrics = {key: (value if key in ("loss", "loss/policy") or not kept else value / kept)
               for key, value in totals.sums.items() if key not in plan.metrics}  # fmt: skip
    if not plan.batches:
        metrics.update({"loss": 0.0, "loss/policy": 0.0, "grpo/clip_fraction": 0.0, "grpo/ratio_mean": 1.0})
    metrics.setdefault("loss/kl", 0.0)
    metrics.update(plan.metrics)
    metrics["grpo/entropy"] = totals.entropy_sum / totals.entropy_tokens if totals.entropy_tokens else math.nan
    metrics["grad_norm"] = sum(totals.grad_norms) / len(totals.grad_norms) if totals.grad_norms else math.nan
    metrics["grpo/skipped_updates"] = float(totals.skipped)
    metrics["grpo/lr"] = agent.hps.lr
    return metrics


def learn(agent: Any, experiences: tuple[Sequence[Tensor], Sequence[Tensor], Tensor]) -> dict[str, float]:
    """One GRPO update of ``agent`` on ``(completion_ids, action_masks, rewards [P, G])``.

    Args:
        agent: The GRPO agent (its model, optimizer, config and switches).
        experiences: Per prompt ``[G, S]`` ids and ``[G, S - 1]`` action masks, and the rewards.

    Returns:
        The update's metrics (see :meth:`GRPO.learn`).

    Raises:
        ValueError: On shapes that do not match ``[P, G]``.
    """
    agent._activate()
    plan = _plan(agent, experiences)
    agent.forget_sampling_logps()  # this update used (or skipped) them; the next one samples anew
    totals = _run_epochs(agent, plan)
    agent.steps += 1
    agent.skipped_updates += totals.skipped
    agent._weights_dirty = True
    return _metrics(agent, plan, totals)
