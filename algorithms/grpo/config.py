"""Hyper-parameters of a GRPO agent and the defaults it is built with.

Split from :mod:`llm_gym.algorithms.grpo.agent` so the config reads on its own (one frozen dataclass,
validated in one place) and the agent module stays about the update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llm_gym.algorithms.grpo.loss import LOSS_TYPES

__all__ = ["GRPOHyperParams", "check_pad_token_id", "clip_pair", "default_lora_config", "resolve_device"]


@dataclass(frozen=True)
class GRPOHyperParams:
    """Every hyper-parameter of one agent, in one place.

    Frozen: change a value with :meth:`GRPO.set_hyperparameter` (mutation), which validates it and
    keeps the optimizer's learning rate in sync.

    Attributes:
        lr: AdamW learning rate of the LoRA parameters.
        beta: Coefficient of the k3 KL penalty to the reference (adapters disabled); 0 skips the
            reference forward pass entirely.
        clip_low: The ratio is clipped below at ``1 - clip_low``.
        clip_high: The ratio is clipped above at ``1 + clip_high``.
        group_size: Completions sampled per prompt (``G >= 2``).
        batch_size: Sequences per forward/backward mini-batch (gradients are accumulated over the
            whole batch: one optimizer step per update epoch).
        max_grad_norm: Gradient norm clip.
        update_epochs: Optimizer steps per batch of experience.
        temperature: Sampling temperature.
        top_p: Nucleus sampling threshold (1.0 = off).
        top_k: Top-k sampling (0 = off).
        max_output_tokens: Generation budget per completion.
        loss_type: ``"grpo"``, ``"dr_grpo"`` or ``"dapo"`` (see :func:`~llm_gym.algorithms.loss.grpo_loss`).
        scale_rewards: Divide advantages by the group std (True) or only centre them (False, Dr. GRPO).
    """

    lr: float = 5e-5
    beta: float = 0.04
    clip_low: float = 0.2
    clip_high: float = 0.2
    group_size: int = 8
    batch_size: int = 16
    max_grad_norm: float = 1.0
    update_epochs: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_output_tokens: int = 1024
    loss_type: str = "grpo"
    scale_rewards: bool = True

    def validate(self) -> None:
        """Check every field.

        Raises:
            ValueError: Naming the field, the rule and the fix.
        """
        if self.group_size < 2:
            raise ValueError(
                f"group_size={self.group_size}: GRPO needs at least 2 completions per prompt (group_size >= 2) "
                "to compare them; use group_size=8 or another value >= 2"
            )
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; valid loss types are {list(LOSS_TYPES)}")
        checks = [
            ("lr", self.lr > 0, "> 0"),
            ("beta", self.beta >= 0, ">= 0"),
            ("clip_low", 0 <= self.clip_low < 1, "in [0, 1)"),
            ("clip_high", self.clip_high >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
            ("update_epochs", self.update_epochs >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0 (use get_action(training=False) for greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
            ("max_output_tokens", self.max_output_tokens >= 1, ">= 1"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be {rule}")


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


def check_pad_token_id(model: Any, pad_token_id: int | None) -> int:
    """Validate the padding id against the model's vocabulary.

    Args:
        model: The causal LM.
        pad_token_id: The id to check.

    Returns:
        The id as an ``int``.

    Raises:
        ValueError: If it is None or outside the vocabulary, with the fix.
    """
    vocab = model.get_input_embeddings().num_embeddings
    if pad_token_id is None:
        raise ValueError(
            "pad_token_id is None: GRPO pads prompts of different lengths into one batch and needs a padding "
            "id. Set tokenizer.pad_token = tokenizer.eos_token and pass pad_token_id=tokenizer.pad_token_id"
        )
    if not 0 <= int(pad_token_id) < vocab:
        raise ValueError(
            f"pad_token_id={pad_token_id} is outside the model's vocabulary [0, {vocab}); pass an id of the "
            "same tokenizer as the model (e.g. tokenizer.eos_token_id)"
        )
    return int(pad_token_id)


def default_lora_config() -> Any:
    """The LoRA adapter used when none is given: ``r=16, alpha=32``, every linear layer, no dropout.

    Returns:
        A ``peft.LoraConfig``.
    """
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def resolve_device(device: Any, accelerator: Any) -> torch.device:
    """The device to train on: ``device`` if given, else the accelerator's, else CUDA when available, else CPU.

    Args:
        device: A device or its name, or None.
        accelerator: An ``accelerate.Accelerator`` or None.

    Returns:
        The ``torch.device``.
    """
    if device is not None:
        return torch.device(device)
    if accelerator is not None and getattr(accelerator, "device", None) is not None:
        return torch.device(accelerator.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
