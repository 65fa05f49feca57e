"""GRPO advantages and loss as pure tensor functions, with the loss variants in one registry.

Everything here is stateless: the trainer computes log-probabilities, passes them in, and gets back a
scalar loss plus a flat ``dict[str, float]`` of namespaced metrics ready for logging. A loss type
(``grpo``, ``dr_grpo``, ``dapo``) is a :class:`LossVariant` of :data:`LOSS_VARIANTS`: its surrogate,
its normaliser and its mini-batch share of the full batch, declared together.

Shape legend used in the comments: ``P`` prompts, ``G`` completions per prompt, ``B = P * G``
sequences, ``T`` completion tokens (padded), ``V`` vocabulary size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "LOSS_TYPES",
    "LOSS_VARIANTS",
    "LossOutput",
    "LossVariant",
    "SurrogateOutput",
    "clipped_surrogate",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "truncated_importance_weights",
]


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: Tensor, *, scale: bool = True, eps: float = 1e-4
) -> tuple[Tensor, dict[str, float]]:
    """Group-relative advantages: each completion's reward against its own prompt's group.

    The standard deviation is the population one (``correction=0``, i.e. ``unbiased=False``), unlike
    TRL which uses Bessel's correction. With the population std the scaled advantages of any
    non-constant group have a root-mean-square of exactly 1 (up to ``eps``) whatever ``G`` is, so
    the advantage scale, and therefore the effective learning rate, does not shift when the group
    size is changed (with Bessel's correction ``G = 2`` gives +-0.707, ``G = 8`` gives ~+-0.94).

    Groups whose rewards are all equal get advantages of exactly 0: they carry no learning signal,
    and forcing 0 avoids float rounding in the mean being blown up by the tiny ``std + eps``.

    Args:
        rewards: Rewards of shape ``[P, G]``, one row per prompt, one column per completion.
        scale: If True divide by ``std_group + eps``; if False only subtract the group mean
            (the Dr. GRPO variant, which avoids up-weighting near-constant groups).
        eps: Added to the group std before dividing.

    Returns:
        A tuple ``(advantages, metrics)``. ``advantages`` has shape ``[P, G]`` and the dtype of
        ``rewards`` (float32 if ``rewards`` is an integer tensor). ``metrics`` holds
        ``grpo/frac_reward_zero_std`` (share of groups with all-equal rewards), ``reward/mean`` and
        ``reward/std`` (population std over all ``P * G`` rewards).

    Raises:
        ValueError: If ``rewards`` is not 2-D, has fewer than 2 completions per group, or contains
            non-finite values.
    """
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must be 2-D [P, G] (prompts x completions), got shape {tuple(rewards.shape)}"
        )
    num_groups, group_size = rewards.shape
    if group_size < 2:
        raise ValueError(
            f"group-relative advantages need at least 2 completions per prompt (G >= 2), got "
            f"G={group_size} from rewards of shape {tuple(rewards.shape)}"
        )
    if num_groups == 0:
        raise ValueError(f"rewards has no groups (P=0), shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf; a reward function returned a non-finite value")

    mean = rewards.mean(dim=1, keepdim=True)  # [P, 1]
    advantages = rewards - mean  # [P, G]
    if scale:
        std = rewards.std(dim=1, keepdim=True, correction=0)  # [P, 1]
        advantages = advantages / (std + eps)

    # Exact equality rather than std < tol: the metric is "no signal at all in this group".
    zero_std = (rewards == rewards[:, :1]).all(dim=1)  # [P]
    advantages = torch.where(zero_std.unsqueeze(1), torch.zeros_like(advantages), advantages)

    metrics = {
        "grpo/frac_reward_zero_std": zero_std.float().mean().item(),
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std(correction=0).item(),
    }
    return advantages, metrics


# --------------------------------------------------------------------------------------------------
# GRPO loss
# --------------------------------------------------------------------------------------------------


class LossOutput(NamedTuple):
    """Result of :func:`grpo_loss`.

    Attributes:
        loss: Scalar tensor to call ``backward()`` on.
        metrics: Namespaced python floats for logging.
    """

    loss: Tensor
    metrics: dict[str, float]


# A normaliser turns masked per-token losses into one scalar: (per_token [B, T] already zero at
# padding, mask [B, T] float, max_completion_length) -> scalar.
Normaliser = Callable[[Tensor, Tensor, int | None], Tensor]


def _normalise_grpo(per_token: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    # Original GRPO: every sequence weighs the same, so a token of a long completion weighs less.
    per_seq = per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B]
    return per_seq.mean()


def _normalise_dr_grpo(per_token: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    # Dr. GRPO: a constant denominator, so no length bias within or across batches.
    if max_len is None:
        raise ValueError(
            "loss_type='dr_grpo' needs max_completion_length (the generation budget): its "
            "denominator must be a constant, and defaulting to the padded width T would make it "
            "vary from batch to batch"
        )
    return per_token.sum() / (per_token.shape[0] * max_len)


def _normalise_dapo(per_token: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    # DAPO: every token in the batch weighs the same.
    return per_token.sum() / mask.sum().clamp(min=1)


# A batch share is the weight of one mini-batch's normalised loss in the full batch's loss, so that
# the mini-batch losses, each times its share, sum to the full-batch loss: (rows, tokens of the
# mini-batch, rows, tokens of the full batch) -> weight. It follows the normaliser's denominator.
BatchShare = Callable[[int, int, int, int], float]


def _share_of_sequences(rows: int, tokens: int, total_rows: int, total_tokens: int) -> float:
    # Denominators that count sequences (grpo: a mean over sequences; dr_grpo: B * max_len).
    return rows / total_rows


def _share_of_tokens(rows: int, tokens: int, total_rows: int, total_tokens: int) -> float:
    # Denominators that count real tokens (dapo).
    return tokens / total_tokens


class SurrogateOutput(NamedTuple):
    """Per-token policy loss of a surrogate, and where its clipped branch is the active one.

    Attributes:
        per_token: ``[B, T]`` policy loss per token, exactly 0 at padding.
        low_clipped: ``[B, T]`` bool, real tokens clipped below (``ratio < 1 - clip_low``, ``A < 0``).
        high_clipped: ``[B, T]`` bool, real tokens clipped above (``ratio > 1 + clip_high``, ``A > 0``).
    """

    per_token: Tensor
    low_clipped: Tensor
    high_clipped: Tensor


# A surrogate: (ratio [B, T] (1 at padding), advantages [B, 1], real [B, T] bool, clip_low,
# clip_high) -> SurrogateOutput.
Surrogate = Callable[[Tensor, Tensor, Tensor, float, float], SurrogateOutput]


def clipped_surrogate(ratio: Tensor, adv: Tensor, real: Tensor, clip_low: float, clip_high: float) -> SurrogateOutput:
    """PPO's clipped surrogate per token: ``-min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)``.

    Args:
        ratio: ``[B, T]`` importance ratios ``exp(logp - old_logp)``, 1 at padding.
        adv: ``[B, 1]`` one advantage per sequence.
        real: ``[B, T]`` True on real completion tokens.
        clip_low: Lower clip range.
        clip_high: Upper clip range.

    Returns:
        The :class:`SurrogateOutput`.
    """
    zeros = torch.zeros_like(ratio)  # [B, T]
    unclipped = ratio * adv  # [B, T]
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv  # [B, T]
    # The clipped term is strictly the smaller one exactly in these two cases; naming them gives
    # the metrics and an explicit min() with no tie-splitting of the gradient.
    high_clipped = (ratio > 1.0 + clip_high) & (adv > 0) & real  # [B, T]
    low_clipped = (ratio < 1.0 - clip_low) & (adv < 0) & real  # [B, T]
    is_clipped = high_clipped | low_clipped  # [B, T]
    per_token = torch.where(real, -torch.where(is_clipped, clipped, unclipped), zeros)  # [B, T]
    return SurrogateOutput(per_token, low_clipped, high_clipped)


@dataclass(frozen=True)
class LossVariant:
    """One loss type: its surrogate, how it reduces tokens to a scalar, and its share of a batch.

    Everything that differs between loss types lives here, so adding one (CISPO, GSPO, ...) is one
    entry of :data:`LOSS_VARIANTS`: the update asks the variant for each mini-batch's
    :attr:`batch_share` and :func:`grpo_loss` uses its :attr:`surrogate` and :attr:`normalise`.

    Attributes:
        surrogate: Per-token policy loss (:func:`clipped_surrogate` for the GRPO family).
        normalise: Masked per-token losses of one batch -> the scalar loss.
        batch_share: Weight of a mini-batch's loss in the full-batch loss; it must match the
            normaliser's denominator (sequences or tokens) for gradient accumulation to be exact.
    """

    surrogate: Surrogate
    normalise: Normaliser
    batch_share: BatchShare


LOSS_VARIANTS: Mapping[str, LossVariant] = MappingProxyType({
    "grpo": LossVariant(clipped_surrogate, _normalise_grpo, _share_of_sequences),
    "dr_grpo": LossVariant(clipped_surrogate, _normalise_dr_grpo, _share_of_sequences),
    "dapo": LossVariant(clipped_surrogate, _normalise_dapo, _share_of_tokens),
})
"""The loss types by name (``GRPOConfig.loss_type``)."""

LOSS_TYPES: tuple[str, ...] = tuple(LOSS_VARIANTS)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of ``KL(pi || pi_ref)`` from samples of ``pi``.

    ``exp(d) - d - 1`` with ``d = ref_logp - logp``: unbiased for the KL (since ``E_pi[exp(d)] = 1``)
    and, unlike the plain ``-d`` estimator, never negative, because ``exp(d) >= 1 + d``.

    Args:
        logp: Log-probs of the sampled tokens under the policy, any shape (``[B, T]`` in practice).
        ref_logp: Log-probs of the same tokens under the reference policy, same shape.

    Returns:
        The per-token estimate, same shape as ``logp``, differentiable with respect to both inputs.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def truncated_importance_weights(
    trainer_logps: Tensor, rollout_logps: Tensor, mask: Tensor, cap: float = 2.0
) -> Tensor:
    """Truncated importance-sampling weights ``min(exp(trainer - rollout), cap)`` per token (TRL's TIS).

    A generation engine (vLLM) samples from a slightly different distribution than the trainer
    computes; scaling each token's policy loss by this (detached) weight corrects the resulting
    off-policy bias (TRL's ``vllm_importance_sampling_correction``, token-level truncation).

    Args:
        trainer_logps: ``[B, T]`` the trainer's log-probs of the sampled tokens under the policy that
            generated them (no gradient flows through the weights).
        rollout_logps: ``[B, T]`` the engine's log-probs of the same tokens.
        mask: ``[B, T]`` bool, the completion tokens.
        cap: Upper clamp of a weight (> 0).

    Returns:
        ``[B, T]`` weights, 0 outside the mask.

    Raises:
        ValueError: If ``cap <= 0``.
    """
    if cap <= 0:
        raise ValueError(f"the importance-sampling cap must be > 0, got {cap}")
    diff = torch.where(mask.bool(), trainer_logps.detach().float() - rollout_logps.float(), torch.zeros(()))
    ratio = torch.exp(diff).clamp(max=cap)  # the difference is zeroed outside the mask: no overflow there
    return torch.where(mask.bool(), ratio, torch.zeros_like(ratio))


def _check_inputs(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    beta: float,
    clip_low: float,
    clip_high: float,
    loss_type: str,
    max_completion_length: int | None,
) -> None:
    if loss_type not in LOSS_VARIANTS:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid names are {sorted(LOSS_VARIANTS)}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be 2-D [B, T], got shape {tuple(logp.shape)}")
    shape = tuple(logp.shape)
    for name, tensor in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} shape {tuple(tensor.shape)} does not match logp shape {shape} ([B, T])"
            )
    if tuple(advantages.shape) != shape[:1]:
        raise ValueError(
            f"advantages must have shape [B] = {shape[:1]} (one per sequence), got "
            f"{tuple(advantages.shape)}"
        )
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    beta: float,
    clip_low: float,
    clip_high: float,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    is_weights: Tensor | None = None,
) -> LossOutput:
    """Token-level clipped GRPO surrogate with an optional k3 KL penalty to a reference policy.

    Per token, with ``ratio = exp(logp - old_logp)`` and the sequence's advantage ``A``::

        loss_t = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + beta * k3_t
        k3_t   = exp(ref - logp) - (ref - logp) - 1        # unbiased, >= 0 estimate of KL(pi || ref)

    and the masked per-token losses are reduced according to ``loss_type``:

    * ``"grpo"``: mean over each sequence's own tokens, then mean over the ``B`` sequences.
    * ``"dr_grpo"``: sum over all tokens / ``(B * max_completion_length)``. ``max_completion_length``
      is required (there is deliberately no default to ``T``, which changes with the batch padding).
    * ``"dapo"``: sum over all tokens / number of real tokens in the batch.

    Padding positions are neutralised before any ``exp`` so garbage log-probs there cannot leak
    ``inf``/``NaN`` into the loss or the gradient, and every denominator is clamped to at least 1,
    so a sequence with an all-zero mask contributes 0 rather than ``NaN``.

    Args:
        logp: Current-policy log-probs of the completion tokens, ``[B, T]``, requires grad.
        old_logp: Log-probs under the policy that generated the samples, ``[B, T]``; None when each
            batch is used for a single update, in which case ``logp.detach()`` is used: the ratio is
            exactly 1 and the gradient is ``A * grad(logp)``.
        ref_logp: Reference-policy log-probs, ``[B, T]``, or None for no KL term.
        advantages: One advantage per sequence, ``[B]``, broadcast over its tokens.
        mask: ``[B, T]``, 1 (or True) for real completion tokens, 0 for padding.
        beta: KL coefficient; 0 disables the KL term in the loss.
        clip_low: Lower clip range: the ratio is clipped below at ``1 - clip_low``.
        clip_high: Upper clip range: the ratio is clipped above at ``1 + clip_high``
            (DAPO's "clip-higher" uses ``clip_high > clip_low``).
        loss_type: One of ``"grpo"``, ``"dr_grpo"``, ``"dapo"``.
        max_completion_length: Generation budget in tokens; required for ``"dr_grpo"``.
        is_weights: ``[B, T]`` importance-sampling weights against the generation engine
            (:func:`truncated_importance_weights`), or None. Each token's policy term is scaled by
            its (detached) weight before the KL term is added, as TRL does; also logged as
            ``grpo/is_ratio_mean``.

    Returns:
        A :class:`LossOutput`. Metrics: ``loss/policy`` (the surrogate alone, same reduction),
        ``loss/kl`` (masked token mean of k3; present only when ``ref_logp`` is given, even if
        ``beta == 0``), ``grpo/clip_fraction``, ``grpo/clip_low_fraction``,
        ``grpo/clip_high_fraction`` (shares of real tokens where the clipped branch is the active
        one), ``grpo/ratio_mean`` (masked token mean) and ``completion/length_mean``.

    Raises:
        ValueError: On an unknown ``loss_type``, mismatched shapes, out-of-range hyper-parameters,
            or ``"dr_grpo"`` without ``max_completion_length``.
    """
    _check_inputs(
        logp, old_logp, ref_logp, advantages, mask, beta, clip_low, clip_high, loss_type,
        max_completion_length,
    )  # fmt: skip
    variant = LOSS_VARIANTS[loss_type]
    normalise = variant.normalise
    real = mask.bool()  # [B, T]
    mask_f = real.to(logp.dtype)  # [B, T]
    zeros = torch.zeros_like(logp)  # [B, T]

    old = logp.detach() if old_logp is None else old_logp
    log_ratio = torch.where(real, logp - old, zeros)  # [B, T], 0 at padding => ratio 1 there
    ratio = torch.exp(log_ratio)  # [B, T]
    adv = advantages.to(logp.dtype).unsqueeze(1)  # [B, 1]

    policy_per_token, low_clipped, high_clipped = variant.surrogate(ratio, adv, real, clip_low, clip_high)
    if is_weights is not None:
        if tuple(is_weights.shape) != tuple(logp.shape):
            raise ValueError(f"is_weights shape {tuple(is_weights.shape)} does not match logp shape {tuple(logp.shape)}")
        policy_per_token = policy_per_token * torch.where(real, is_weights.detach().to(logp.dtype), zeros)
    is_clipped = high_clipped | low_clipped  # [B, T]

    per_token = policy_per_token
    kl_per_token: Tensor | None = None
    if ref_logp is not None:
        # Both inputs are zeroed at padding before the exp, so k3 is exactly 0 there.
        kl_per_token = k3_kl(torch.where(real, logp, zeros), torch.where(real, ref_logp, zeros))  # [B, T]
        if beta != 0:
            per_token = per_token + beta * kl_per_token

    loss = normalise(per_token, mask_f, max_completion_length)

    with torch.no_grad():
        n_tokens = mask_f.sum().clamp(min=1)
        policy_loss = loss if per_token is policy_per_token else normalise(
            policy_per_token, mask_f, max_completion_length
        )
        metrics = {
            "loss/policy": policy_loss.item(),
            "grpo/clip_fraction": (is_clipped.sum() / n_tokens).item(),
            "grpo/clip_low_fraction": (low_clipped.sum() / n_tokens).item(),
            "grpo/clip_high_fraction": (high_clipped.sum() / n_tokens).item(),
            "grpo/ratio_mean": ((ratio * mask_f).sum() / n_tokens).item(),
            "completion/length_mean": mask_f.sum(dim=1).mean().item(),
        }
        if is_weights is not None:
            metrics["grpo/is_ratio_mean"] = ((is_weights.to(mask_f.dtype) * mask_f).sum() / n_tokens).item()
        if kl_per_token is not None:
            metrics["loss/kl"] = ((kl_per_token * mask_f).sum() / n_tokens).item()
    return LossOutput(loss=loss, metrics=metrics)
