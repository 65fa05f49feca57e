"""Every setting of one GRPO agent in one frozen dataclass: :class:`GRPOConfig`.

The agent (:class:`~llm_gym.algorithms.grpo.agent.GRPO`) takes a config, or builds one from keyword
arguments (seed 001's ``GRPO(model_name=..., lr=..., group_size=...)``) through :meth:`GRPOConfig.build`,
so each setting is declared, documented and validated here once. Evolution reads and writes the
hyper-parameters through ``agent.get_hp`` / ``agent.set_hp``, which go through :meth:`GRPOConfig.replace`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llm_gym.algorithms.grpo.loss import LOSS_TYPES
from llm_gym.algorithms.rollout.backend import BACKENDS

__all__ = ["FIXED_SETTINGS", "GRPOConfig", "GRPOHyperParams", "clip_pair"]

FIXED_SETTINGS = ("max_model_len", "backend", "vllm_importance_sampling_correction")
"""Settings fixed when the agent is built: mutation may not change them and a checkpoint does not
load them (the generation engine is built around them)."""


@dataclass(frozen=True)
class GRPOConfig:
    """Hyper-parameters and generation settings of one GRPO agent.

    Frozen: an agent changes a value with :meth:`GRPO.set_hp` (mutation), which validates it through
    :meth:`replace` and keeps the optimizer's learning rate in sync. Defaults follow TRL / AgileRL,
    tuned for LoRA (``lr=5e-5``: LoRA needs a larger step than full fine-tuning's ~1e-6).

    Raises:
        ValueError: On an invalid value, naming the field, the rule and a valid value.
    """

    lr: float = 5e-5
    """AdamW learning rate of the LoRA parameters."""
    beta: float = 0.04
    """Coefficient of the k3 KL penalty to the reference (adapters disabled); 0 skips the reference
    forward pass entirely."""
    clip_low: float = 0.2
    """The ratio is clipped below at ``1 - clip_low``."""
    clip_high: float = 0.2
    """The ratio is clipped above at ``1 + clip_high`` (DAPO's clip-higher: ``clip_high > clip_low``)."""
    group_size: int = 8
    """Completions sampled per prompt (``G >= 2``)."""
    batch_size: int = 16
    """Sequences per forward/backward mini-batch (gradients are accumulated over the whole batch:
    one optimizer step per update epoch)."""
    max_grad_norm: float = 1.0
    """Gradient norm clip."""
    update_epochs: int = 1
    """Optimizer steps per batch of experience (1: exactly on-policy, no old-log-prob pass)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    max_output_tokens: int = 1024
    """Generation budget per completion (per model turn of a multi-turn episode)."""
    loss_type: str = "grpo"
    """A loss variant of :data:`~llm_gym.algorithms.grpo.loss.LOSS_VARIANTS`: ``"grpo"``, ``"dr_grpo"``, ``"dapo"``."""
    scale_rewards: bool = True
    """Divide advantages by the group std (True) or only centre them (False, Dr. GRPO)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (:mod:`~llm_gym.algorithms.grpo.dynamic`): drop groups whose completions
    all score the same and, in the training loop, draw more prompts to refill the batch."""
    max_refills: int = 3
    """Extra prompt batches the training loop may draw per step to refill it (dynamic sampling);
    after these it trains on the informative groups it has."""
    max_model_len: int | None = None
    """Context length (prompt + completion). When a prompt plus ``max_output_tokens`` does not fit,
    the batch's generation budget is cut to fit (warned once); a prompt that fills it alone is an error."""
    backend: str = "hf"
    """Generation backend, a name of :data:`~llm_gym.algorithms.rollout.backend.BACKENDS` (``"hf"``, ``"vllm"``, ``"vllm-server"``)."""
    vllm_importance_sampling_correction: bool = False
    """TRL's truncated importance sampling against the engine/trainer drift: the vLLM backends return
    each sampled token's log-prob and every token's policy loss is weighted by
    ``min(exp(trainer_old_logp - vllm_logp), vllm_importance_sampling_cap)``
    (:func:`~llm_gym.algorithms.grpo.loss.truncated_importance_weights`; logged as ``grpo/is_ratio_mean``).
    Applied only to experience whose sampling log-probs the backend returned for every prompt (never with
    ``"hf"``; multi-turn episodes, assembled from several calls, are trained without it)."""
    vllm_importance_sampling_cap: float = 2.0
    """Upper clamp of the importance-sampling weight (TRL's TIS default, 2.0)."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(
                f"group_size={self.group_size}: GRPO needs at least 2 completions per prompt (group_size >= 2) "
                "to compare them; use group_size=8 or another value >= 2"
            )
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; valid loss types are {list(LOSS_TYPES)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; valid backends are {sorted(BACKENDS)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(
                f"max_model_len={self.max_model_len} must be >= 2 (prompt + at least one token) or None (no limit)"
            )
        checks = [
            ("lr", self.lr > 0, "> 0"),
            ("beta", self.beta >= 0, ">= 0 (0 turns the KL term off)"),
            ("clip_low", 0 <= self.clip_low < 1, "in [0, 1)"),
            ("clip_high", self.clip_high >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
            ("update_epochs", self.update_epochs >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0 (use get_action(training=False) for greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
            ("max_output_tokens", self.max_output_tokens >= 1, ">= 1"),
            ("max_refills", self.max_refills >= 0, ">= 0 (0: drop zero-variance groups, never refill)"),
            ("vllm_importance_sampling_cap", self.vllm_importance_sampling_cap > 0, "> 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                default = _DEFAULTS[name]
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is invalid: it must be {rule}; e.g. {name}={default!r} (the default)"
                )

    @property
    def clip_coef(self) -> float | tuple[float, float]:
        """The clip range: one float when symmetric, else ``(clip_low, clip_high)``."""
        return self.clip_low if self.clip_low == self.clip_high else (self.clip_low, self.clip_high)

    @classmethod
    def names(cls) -> list[str]:
        """Every setting a keyword may name: the fields, plus ``clip_coef`` (sets both clip bounds)."""
        return [f.name for f in dataclasses.fields(cls)] + ["clip_coef"]

    def replace(self, **settings: Any) -> GRPOConfig:
        """A copy with ``settings`` changed (validated); ``clip_coef`` (a float or a pair) sets both bounds.

        Args:
            **settings: Field names of this class, or ``clip_coef``.

        Returns:
            The new config.

        Raises:
            ValueError: On an unknown name (listing the valid ones) or an invalid value.
        """
        unknown = [name for name in settings if name not in self.names()]
        if unknown:
            raise ValueError(f"unknown hyper-parameter {unknown[0]!r}; valid names are {self.names()}")
        if "clip_coef" in settings:
            low, high = clip_pair(settings.pop("clip_coef"))
            settings = {"clip_low": low, "clip_high": high, **settings}
        return dataclasses.replace(self, **settings)

    @classmethod
    def build(cls, config: GRPOConfig | None = None, **settings: Any) -> GRPOConfig:
        """``config`` (default: the defaults) with ``settings`` replaced, as :meth:`replace`."""
        return (config if config is not None else cls()).replace(**settings)


GRPOHyperParams = GRPOConfig
"""The config's former name, kept so ``from llm_gym.algorithms import GRPOHyperParams`` still works."""

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}


def clip_pair(clip_coef: float | Sequence[float]) -> tuple[float, float]:
    """Turn ``clip_coef`` (one float or a ``(low, high)`` pair) into ``(low, high)``.

    Args:
        clip_coef: A symmetric clip range or an asymmetric pair (DAPO's clip-higher).

    Returns:
        ``(clip_low, clip_high)``.

    Raises:
        ValueError: If a sequence does not hold exactly two numbers.
    """
    if isinstance(clip_coef, (int, float)):
        return float(clip_coef), float(clip_coef)
    pair = tuple(float(c) for c in clip_coef)
    if len(pair) != 2:
        raise ValueError(f"clip_coef must be a float or a (low, high) pair, got {clip_coef!r}")
    return pair[0], pair[1]
