"""Tests for llm_gym.algorithms.grpo.loss; expected numbers are worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from llm_gym.algorithms.grpo.logps import selective_log_softmax, token_entropy
from llm_gym.algorithms.grpo.loss import (
    LOSS_TYPES,
    LossOutput,
    group_advantages,
    grpo_loss,
    k3_kl,
    truncated_importance_weights,
)

TOL = 1e-6
F64 = torch.float64


def close(actual: torch.Tensor | float, expected: object) -> None:
    """Assert equality within TOL, for tensors or floats."""
    actual_t = torch.as_tensor(actual, dtype=F64)
    expected_t = torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(actual_t, expected_t, atol=TOL, rtol=0)


def ln(x: float) -> float:
    return math.log(x)


# --------------------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------------------

# row 0: [1, 0, 0, 0]: mean 0.25, deviations [.75, -.25, -.25, -.25],
#        population var = (.5625 + 3 * .0625) / 4 = .1875, std = sqrt(3) / 4
#        => scaled (eps = 0): [.75 / (sqrt3/4), -.25 / (sqrt3/4) x3] = [sqrt3, -1/sqrt3 x3]
# row 1: [3, 3, 3, 3]: all equal => advantages exactly 0, counted in frac_reward_zero_std
# row 2: [0, 2, 4, 6]: mean 3, deviations [-3, -1, 1, 3], var = (9+1+1+9)/4 = 5, std = sqrt5
REWARDS = torch.tensor([[1, 0, 0, 0], [3, 3, 3, 3], [0, 2, 4, 6]], dtype=F64)
S3, S5 = math.sqrt(3), math.sqrt(5)


def test_group_advantages_scaled_by_hand() -> None:
    adv, metrics = group_advantages(REWARDS, eps=0.0)
    close(
        adv,
        [[S3, -1 / S3, -1 / S3, -1 / S3], [0, 0, 0, 0], [-3 / S5, -1 / S5, 1 / S5, 3 / S5]],
    )
    close(metrics["grpo/frac_reward_zero_std"], 1 / 3)
    # all 12 rewards: sum 25 => mean 25/12; sum of squares 1 + 4*9 + 0+4+16+36 = 93
    # var = 93/12 - (25/12)^2 = (1116 - 625) / 144 = 491/144 => std = sqrt(491) / 12
    close(metrics["reward/mean"], 25 / 12)
    close(metrics["reward/std"], math.sqrt(491) / 12)
    assert set(metrics) == {"grpo/frac_reward_zero_std", "reward/mean", "reward/std"}
    assert all(isinstance(v, float) for v in metrics.values())


def test_group_advantages_default_eps_and_unscaled() -> None:
    adv, _ = group_advantages(REWARDS)  # eps = 1e-4 added to the std
    close(adv[2], [d / (S5 + 1e-4) for d in (-3, -1, 1, 3)])
    close(adv[0, 0], 0.75 / (S3 / 4 + 1e-4))
    close(adv[1], [0, 0, 0, 0])
    raw, metrics = group_advantages(REWARDS, scale=False)
    close(raw, [[0.75, -0.25, -0.25, -0.25], [0, 0, 0, 0], [-3, -1, 1, 3]])
    close(metrics["grpo/frac_reward_zero_std"], 1 / 3)


def test_group_advantages_zero_std_is_exactly_zero_despite_rounding() -> None:
    # fp32 mean of three 0.1s is not exactly 0.1; without the explicit zeroing the rounding error
    # divided by eps = 1e-4 would give a spurious non-zero advantage.
    rewards = torch.full((2, 3), 0.1, dtype=torch.float32)
    adv, metrics = group_advantages(rewards)
    assert torch.equal(adv, torch.zeros_like(adv))
    assert metrics["grpo/frac_reward_zero_std"] == 1.0


def test_group_advantages_integer_rewards_and_g2() -> None:
    # [1, 0]: mean .5, population std .5 => [+1, -1] (eps = 0); Bessel's std would give +-1/sqrt2
    adv, _ = group_advantages(torch.tensor([[1, 0]]), eps=0.0)
    assert adv.dtype == torch.float32
    close(adv, [[1.0, -1.0]])


@pytest.mark.parametrize(
    ("rewards", "message"),
    [
        (torch.zeros(4), r"2-D \[P, G\].*\(4,\)"),
        (torch.zeros(3, 4, 1), r"2-D \[P, G\]"),
        (torch.zeros(3, 1), r"G >= 2.*G=1"),
        (torch.tensor([[1.0, float("nan")]]), "non-finite"),
    ],
)
def test_group_advantages_rejects_bad_input(rewards: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards)


# --------------------------------------------------------------------------------------------------
# selective_log_softmax / token_entropy
# --------------------------------------------------------------------------------------------------


def _reference_logp(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 15, 1000])
def test_selective_log_softmax_matches_full_log_softmax(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=gen, dtype=F64) * 3).requires_grad_()
    index = torch.randint(0, 11, (3, 5), generator=gen)
    weights = torch.randn(3, 5, generator=gen, dtype=F64)  # arbitrary upstream gradient

    out = selective_log_softmax(logits, index, chunk_size=chunk_size)  # 15 rows
    ref = _reference_logp(logits, index)
    assert out.shape == (3, 5) and out.dtype == F64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)

    (grad,) = torch.autograd.grad((out * weights).sum(), logits)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=0)


def test_selective_log_softmax_gradcheck() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, generator=gen, dtype=F64, requires_grad=True)
    index = torch.randint(0, 6, (2, 3), generator=gen)
    assert torch.autograd.gradcheck(lambda z: selective_log_softmax(z, index, chunk_size=4), (logits,))


def test_selective_log_softmax_bf16_is_computed_in_fp32() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 50, generator=gen).to(torch.bfloat16).requires_grad_()
    index = torch.randint(0, 50, (2, 4), generator=gen)
    out = selective_log_softmax(logits, index, chunk_size=3)
    assert out.dtype == torch.float32
    # Same bf16 values, upcast exactly, then the full fp32 log-softmax.
    torch.testing.assert_close(out, _reference_logp(logits.detach().float(), index), atol=1e-6, rtol=0)
    out.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_selective_log_softmax_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"index shape \(2, 4\).*\(2, 3, 5\)"):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), chunk_size=0)


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_token_entropy(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 9, generator=gen, dtype=F64)
    logp = torch.log_softmax(logits, dim=-1)
    expected = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(token_entropy(logits, chunk_size=chunk_size), expected, atol=1e-12, rtol=0)
    # uniform over 8 tokens => ln 8; one-hot-ish (huge gap) => ~0
    close(token_entropy(torch.zeros(1, 1, 8)), [[ln(8)]])
    close(token_entropy(torch.tensor([[[0.0, -1e4, -1e4]]])), [[0.0]])


# --------------------------------------------------------------------------------------------------
# grpo_loss: surrogate and clipping
# --------------------------------------------------------------------------------------------------

CLIP = {"clip_low": 0.2, "clip_high": 0.2}


def test_surrogate_without_old_logp_is_minus_advantage() -> None:
    # B = 2, lengths 3 and 2, A = [2, -1]. Ratio == 1, so per-token loss = -A:
    # row 0: -2 each, row 1: +1 each (padding ignored). grpo: mean(-2, 1) = -0.5.
    # d loss / d logp[b, t] = -A_b / len_b / B: row 0: -2/3/2 = -1/3; row 1: 1/2/2 = 1/4; pad: 0.
    logp = torch.tensor([[ln(0.5), ln(0.25), ln(0.1)], [ln(0.3), ln(0.6), ln(0.9)]], dtype=F64)
    logp.requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = grpo_loss(logp, None, None, torch.tensor([2.0, -1.0]), mask, beta=0.0, **CLIP)
    assert isinstance(out, LossOutput) and out.loss.dim() == 0
    close(out.loss, -0.5)
    out.loss.backward()
    close(logp.grad, [[-1 / 3, -1 / 3, -1 / 3], [0.25, 0.25, 0.0]])
    m = out.metrics
    close(m["loss/policy"], -0.5)
    close(m["grpo/ratio_mean"], 1.0)
    close(m["grpo/clip_fraction"], 0.0)
    close(m["completion/length_mean"], 2.5)
    assert "loss/kl" not in m  # no reference policy given
    assert all(isinstance(v, float) for v in m.values())


def test_high_clip_with_positive_advantage() -> None:
    # A = +1, clip 0.2. token 0: ratio e^0.5 ~ 1.6487 > 1.2 => min(1.6487, 1.2) = 1.2, loss -1.2,
    # no gradient. token 1: ratio 1.1 inside => loss -1.1, d/dlogp = -ratio * A / T = -1.1/2.
    # grpo loss = (-1.2 - 1.1) / 2 = -1.15.
    old = torch.tensor([[ln(0.3), ln(0.2)]], dtype=F64)
    logp = (old + torch.tensor([[0.5, ln(1.1)]], dtype=F64)).requires_grad_()
    out = grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 2), beta=0.0, **CLIP)
    close(out.loss, -1.15)
    out.loss.backward()
    close(logp.grad, [[0.0, -0.55]])
    close(out.metrics["grpo/clip_fraction"], 0.5)
    close(out.metrics["grpo/clip_high_fraction"], 0.5)
    close(out.metrics["grpo/clip_low_fraction"], 0.0)
    close(out.metrics["grpo/ratio_mean"], (math.exp(0.5) + 1.1) / 2)


def test_low_clip_with_negative_advantage() -> None:
    # A = -1. token 0: ratio e^-0.5 ~ 0.6065 < 0.8 => min(-0.6065, 0.8 * -1 = -0.8) = -0.8,
    # loss +0.8, no gradient. token 1: ratio 0.9 => min(-0.9, -0.9), loss 0.9,
    # d/dlogp = -ratio * A / T = 0.9/2 = 0.45. grpo loss = (0.8 + 0.9) / 2 = 0.85.
    old = torch.tensor([[ln(0.3), ln(0.2)]], dtype=F64)
    logp = (old + torch.tensor([[-0.5, ln(0.9)]], dtype=F64)).requires_grad_()
    out = grpo_loss(logp, old, None, torch.tensor([-1.0]), torch.ones(1, 2), beta=0.0, **CLIP)
    close(out.loss, 0.85)
    out.loss.backward()
    close(logp.grad, [[0.0, 0.45]])
    close(out.metrics["grpo/clip_low_fraction"], 0.5)
    close(out.metrics["grpo/clip_high_fraction"], 0.0)
    close(out.metrics["grpo/clip_fraction"], 0.5)


def test_out_of_range_ratio_on_the_unclipped_side_keeps_its_gradient() -> None:
    # A = +1 and ratio e^-0.5 < 0.8: min(0.6065, 0.8) picks the unclipped term (the pessimistic
    # bound), so the token is not clipped: loss -e^-0.5, gradient -e^-0.5. Same for A = -1 with
    # ratio e^0.5 > 1.2 (asymmetric clip 0.1 / 0.2): min(-1.6487, -1.2) = -1.6487, gradient +e^0.5.
    old = torch.tensor([[ln(0.3)], [ln(0.4)]], dtype=F64)
    logp = (old + torch.tensor([[-0.5], [0.5]], dtype=F64)).requires_grad_()
    out = grpo_loss(
        logp, old, None, torch.tensor([1.0, -1.0]), torch.ones(2, 1), beta=0.0, clip_low=0.1, clip_high=0.2
    )
    close(out.loss, (-math.exp(-0.5) + math.exp(0.5)) / 2)
    out.loss.backward()
    close(logp.grad, [[-math.exp(-0.5) / 2], [math.exp(0.5) / 2]])
    close(out.metrics["grpo/clip_fraction"], 0.0)


# --------------------------------------------------------------------------------------------------
# grpo_loss: KL
# --------------------------------------------------------------------------------------------------


def test_k3_kl_hand_value_and_properties() -> None:
    # logp = ln .5, ref = ln .25: ref - logp = -ln2 => k3 = e^-ln2 + ln2 - 1 = 0.5 + ln2 - 1
    k3 = 0.5 + math.log(2) - 1
    close(k3, 0.19314718056)
    close(k3_kl(torch.tensor([ln(0.5)], dtype=F64), torch.tensor([ln(0.25)], dtype=F64)), [k3])
    same = torch.randn(10, dtype=F64)
    close(k3_kl(same, same), [0.0] * 10)
    gen = torch.Generator().manual_seed(4)
    values = k3_kl(torch.randn(1000, generator=gen) * 5, torch.randn(1000, generator=gen) * 5)
    assert bool((values >= 0).all())


def test_kl_term_in_loss() -> None:
    # A = 0 kills the surrogate, so loss = beta * k3 = 0.1 * 0.193147...
    # d/dlogp [beta * (e^(ref-logp) - (ref-logp) - 1)] = beta * (1 - e^(ref-logp)) = 0.1 * 0.5.
    k3 = 0.5 + math.log(2) - 1
    logp = torch.tensor([[ln(0.5)]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[ln(0.25)]], dtype=F64)
    out = grpo_loss(logp, None, ref, torch.zeros(1), torch.ones(1, 1), beta=0.1, **CLIP)
    close(out.loss, 0.1 * k3)
    out.loss.backward()
    close(logp.grad, [[0.05]])
    close(out.metrics["loss/kl"], k3)
    close(out.metrics["loss/policy"], 0.0)
    # beta = 0: no KL in the loss, but still reported for monitoring.
    out0 = grpo_loss(logp, None, ref, torch.zeros(1), torch.ones(1, 1), beta=0.0, **CLIP)
    close(out0.loss, 0.0)
    close(out0.metrics["loss/kl"], k3)


def test_kl_metric_is_masked_token_mean() -> None:
    # tokens: (ln .5 vs ln .25) -> k3, (x vs x) -> 0, padding with a wild ref -> ignored
    k3 = 0.5 + math.log(2) - 1
    logp = torch.tensor([[ln(0.5), ln(0.3), ln(0.2)]], dtype=F64)
    ref = torch.tensor([[ln(0.25), ln(0.3), -50.0]], dtype=F64)
    out = grpo_loss(logp, None, ref, torch.zeros(1), torch.tensor([[1, 1, 0]]), beta=1.0, **CLIP)
    close(out.metrics["loss/kl"], k3 / 2)
    close(out.loss, k3 / 2)  # grpo: (k3 + 0) / 2 tokens


# --------------------------------------------------------------------------------------------------
# grpo_loss: normalisations and robustness
# --------------------------------------------------------------------------------------------------

# 2x3, lengths 3 and 1, A = [1, -2], old = None => per-token loss -A:
# row 0: [-1, -1, -1], row 1: [2, pad, pad]. Masked sum = -3 + 2 = -1, 4 real tokens.
#   grpo:    mean(-3/3, 2/1) = 0.5
#   dr_grpo: -1 / (B * L) = -1 / (2 * 4) = -0.125 with max_completion_length L = 4
#   dapo:    -1 / 4 = -0.25
NORM_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])
NORM_ADV = torch.tensor([1.0, -2.0])


@pytest.mark.parametrize(
    ("loss_type", "expected", "grad_row0", "grad_row1"),
    [
        # gradients: -A_b times d(normaliser)/d(token): grpo 1/(B*len_b), dr_grpo 1/(B*L), dapo 1/N
        ("grpo", 0.5, -1 / 6, 1.0),
        ("dr_grpo", -0.125, -1 / 8, 2 / 8),
        ("dapo", -0.25, -1 / 4, 2 / 4),
    ],
)
def test_normalisations(loss_type: str, expected: float, grad_row0: float, grad_row1: float) -> None:
    logp = torch.log(torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.1, 0.7]], dtype=F64)).requires_grad_()
    out = grpo_loss(
        logp, None, None, NORM_ADV, NORM_MASK, beta=0.0, loss_type=loss_type, max_completion_length=4, **CLIP
    )
    close(out.loss, expected)
    close(out.metrics["loss/policy"], expected)
    out.loss.backward()
    close(logp.grad, [[grad_row0] * 3, [grad_row1, 0.0, 0.0]])
    assert LOSS_TYPES == ("grpo", "dr_grpo", "dapo")


def test_all_zero_mask_row_is_finite() -> None:
    # Row 1 is entirely padding and holds garbage (-inf / nan) log-probs, as a careless caller
    # might pass. Row 0: A = 1, ratio 1 => -1 per token.
    #   grpo: mean(-1, 0) = -0.5; dapo: -2 / 2 = -1; dr_grpo (L = 2): -2 / (2 * 2) = -0.5.
    nan, inf = float("nan"), float("inf")
    base = torch.tensor([[ln(0.5), ln(0.5)], [-inf, nan]], dtype=F64)
    old = torch.tensor([[ln(0.5), ln(0.5)], [nan, -inf]], dtype=F64)
    ref = torch.tensor([[ln(0.5), ln(0.5)], [inf, nan]], dtype=F64)
    mask = torch.tensor([[1, 1], [0, 0]])
    for loss_type, expected in (("grpo", -0.5), ("dapo", -1.0), ("dr_grpo", -0.5)):
        logp = base.clone().requires_grad_()
        out = grpo_loss(
            logp, old, ref, torch.tensor([1.0, 0.5]), mask, beta=0.1,
            loss_type=loss_type, max_completion_length=2, **CLIP,
        )  # fmt: skip
        close(out.loss, expected)
        out.loss.backward()
        assert torch.isfinite(logp.grad).all() and bool((logp.grad[1] == 0).all())
        assert all(math.isfinite(v) for v in out.metrics.values()), out.metrics
    close(out.metrics["completion/length_mean"], 1.0)
    # Fully empty batch: loss 0, not NaN.
    empty = grpo_loss(torch.zeros(2, 3), None, None, torch.ones(2), torch.zeros(2, 3), beta=0.0, **CLIP)
    close(empty.loss, 0.0)


# --------------------------------------------------------------------------------------------------
# grpo_loss: validation
# --------------------------------------------------------------------------------------------------


def _call(**overrides: object) -> LossOutput:
    kwargs: dict[str, object] = {
        "logp": torch.zeros(2, 3),
        "old_logp": None,
        "ref_logp": None,
        "advantages": torch.zeros(2),
        "mask": torch.ones(2, 3),
        "beta": 0.0,
        "clip_low": 0.2,
        "clip_high": 0.2,
    }
    kwargs.update(overrides)
    return grpo_loss(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss_type": "ppo"}, r"unknown loss_type 'ppo'; valid names are \['dapo', 'dr_grpo', 'grpo'\]"),
        ({"loss_type": "dr_grpo"}, "loss_type='dr_grpo' needs max_completion_length"),
        ({"mask": torch.ones(2, 4)}, r"mask shape \(2, 4\) does not match logp shape \(2, 3\)"),
        ({"old_logp": torch.zeros(3, 3)}, r"old_logp shape \(3, 3\) does not match logp shape \(2, 3\)"),
        ({"ref_logp": torch.zeros(2)}, r"ref_logp shape \(2,\) does not match logp shape \(2, 3\)"),
        ({"advantages": torch.zeros(2, 1)}, r"advantages must have shape \[B\] = \(2,\).*got \(2, 1\)"),
        ({"logp": torch.zeros(6)}, r"logp must be 2-D \[B, T\], got shape \(6,\)"),
        ({"beta": -0.1}, "beta must be >= 0"),
        ({"clip_low": 1.0}, r"clip_low must be in \[0, 1\)"),
        ({"clip_high": -0.1}, "clip_high must be >= 0"),
        ({"loss_type": "dr_grpo", "max_completion_length": 0}, "max_completion_length must be >= 1"),
    ],
)
def test_grpo_loss_validation(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


def test_importance_sampling_weights_scale_each_tokens_policy_term_by_hand():
    # Two sequences of two tokens; the second token of row 1 is padding.
    # trainer - engine log-prob differences: ln 0.5, ln 3, ln 1.5, (padding) -> weights 0.5, min(3, 2) = 2, 1.5, 0
    engine = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=F64)
    trainer = engine + torch.tensor([[ln(0.5), ln(3.0)], [ln(1.5), 100.0]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False]])
    weights = truncated_importance_weights(trainer, engine, mask, cap=2.0)
    close(weights, [[0.5, 2.0], [1.5, 0.0]])
    # On-policy (old_logp None: ratio 1), advantages +1 and -2, beta 0, "grpo" loss:
    # per-token loss -A * w = [-0.5, -2.0] and [3.0]; per-sequence means -1.25 and 3.0; batch mean 0.875
    logp = trainer.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    out = grpo_loss(logp, None, None, adv, mask, beta=0.0, clip_low=0.2, clip_high=0.2, is_weights=weights)
    close(out.loss, 0.875)
    close(out.metrics["grpo/is_ratio_mean"], (0.5 + 2.0 + 1.5) / 3)
    out.loss.backward()
    # d loss / d logp_t = -A * w_t / (tokens of the row * rows): [-0.125, -0.5] and [1.5, 0]
    close(logp.grad, [[-0.125, -0.5], [1.5, 0.0]])
    # The KL term is added unweighted (as TRL does): ref = logp - 1 on row 0's tokens, k3 = e^-1 + 1 - 1 = e^-1
    ref = trainer.detach() - 1.0
    with_kl = grpo_loss(trainer, None, ref, adv, mask, beta=0.1, clip_low=0.2, clip_high=0.2, is_weights=weights)
    close(with_kl.loss, 0.875 + 0.1 * math.exp(-1.0))
    with pytest.raises(ValueError, match="the importance-sampling cap must be > 0, got 0.0"):
        truncated_importance_weights(trainer, engine, mask, cap=0.0)
