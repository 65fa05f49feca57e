"""Temporary swaps of PEFT's LoRA ``Linear`` wrappers for leaner modules, and back.

PEFT's LoRA ``Linear`` computes ``base(x) + scale * B(A(dropout(x)))`` with a Python wrapper per
layer, a scalar multiply and an add over the whole output. Three swaps, each a context manager that
puts the original modules back on exit (even on error) and never modifies a weight:

* :func:`merged_lora` (decoding, no gradients): a plain ``nn.Linear`` holding ``W + scale * B A``;
* :func:`base_model_only` (the GRPO reference pass): each layer's own ``base_layer``;
* :func:`fused_lora` (the GRPO policy pass, with gradients): the LoRA product is accumulated into
  the base output inside one in-place ``addmm``, so the scalar multiply and the add (and the
  multiply's backward) over the ``[tokens, out]`` output disappear.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["FusedLoraLinear", "base_model_only", "fused_lora", "merged_lora"]


def _lora_layers(model: Any) -> tuple[list[tuple[Any, str, Any]], bool]:
    """PEFT LoRA ``Linear`` layers that can run as plain linears, and whether they are all the adapters.

    Returns:
        ``(found, complete)``: ``(parent, attribute, layer)`` for each mergeable LoRA ``Linear``;
        ``complete`` is False when the model holds other PEFT layers (DoRA, LoRA bias, other tuner
        types, ``modules_to_save`` / trainable-token wrappers) that a swap would not cover.
    """
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # pragma: no cover - peft is a dependency
        return [], True
    found, complete = [], True
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is LoraLinear and _mergeable(child):
                found.append((parent, name, child))
            elif isinstance(child, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                complete = False
    return found, complete


def _mergeable(layer: Any) -> bool:
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    return (
        isinstance(layer.base_layer, torch.nn.Linear)
        and not any(layer.use_dora.get(a, False) for a in adapters)
        and not any(getattr(layer, "lora_bias", {}).get(a, False) for a in adapters)
        and layer.base_layer.weight.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    )


def _merged_linear(layer: Any) -> torch.nn.Linear:
    """A plain ``nn.Linear`` computing what ``layer`` computes now, with ``W + sum_a scale_a B_a A_a``."""
    base = layer.base_layer
    weight = base.weight.detach()
    if not layer.disable_adapters and not layer.merged:
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight = weight + layer.get_delta_weight(adapter).detach().to(weight.dtype)
    plain = torch.nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
    plain.weight = torch.nn.Parameter(weight, requires_grad=False)
    plain.bias = base.bias  # shared, not copied
    return plain


@contextlib.contextmanager
def _swapped(found: list[tuple[Any, str, Any]], make: Callable[[Any], torch.nn.Module]) -> Iterator[int]:
    """Put ``make(layer)`` in each ``(parent, name, layer)`` slot; restore the layers on exit, even on error."""
    done = []
    try:
        for parent, name, layer in found:
            setattr(parent, name, make(layer))
            done.append((parent, name, layer))
        yield len(done)
    finally:
        for parent, name, layer in reversed(done):
            setattr(parent, name, layer)


@contextlib.contextmanager
def merged_lora(model: Any) -> Iterator[int]:
    """Temporarily replace each LoRA ``Linear`` by a plain ``nn.Linear`` with the merged weight.

    The merged weight is a new tensor ``W + sum_a scale_a * B_a @ A_a`` over the active adapters
    (``W`` alone while adapters are disabled); the base weight, bias and adapter parameters
    are not modified, and the original modules are put back on exit, even on error. Layers PEFT
    cannot merge this way (DoRA, LoRA bias, quantized bases) are left wrapped. Use only under
    ``torch.no_grad()``: the merged copies do not track gradients.

    Args:
        model: Any module; without LoRA layers this is a no-op.

    Yields:
        How many layers were swapped.
    """
    with _swapped(_lora_layers(model)[0], _merged_linear) as count:
        yield count


@contextlib.contextmanager
def base_model_only(model: Any) -> Iterator[None]:
    """Run a PEFT model as its base model (the GRPO reference policy), with the least overhead.

    Each LoRA ``Linear`` is temporarily replaced by its own ``base_layer`` (the very module PEFT
    calls when adapters are disabled, so outputs are identical), which skips PEFT's per-layer
    wrapper and its ``disable_adapter`` walk over all modules. Models holding PEFT layers a swap
    cannot cover fall back to ``model.disable_adapter()``.

    Args:
        model: A ``PeftModel``.

    Yields:
        Nothing; the model is restored on exit, even on error.
    """
    found, complete = _lora_layers(model)
    if not complete or not found:
        with model.disable_adapter():
            yield
        return
    with _swapped(found, lambda layer: layer.base_layer):
        yield


class FusedLoraLinear(torch.nn.Module):
    """What a plain LoRA ``Linear`` computes, with the adapter product added inside ``addmm_``.

    Holds the wrapped layer's own base layer, adapter parameters and dropout modules (no copies),
    so gradients reach the very parameters the optimizer holds.

    Args:
        layer: A PEFT LoRA ``Linear`` accepted by ``_mergeable``.
    """

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.base_layer = layer.base_layer
        self.adapters: list[tuple[Tensor, Tensor, float, Any]] = []
        if not layer.disable_adapters and not layer.merged:
            for name in layer.active_adapters:
                if name in layer.lora_A:
                    self.adapters.append((layer.lora_A[name].weight, layer.lora_B[name].weight,
                                          float(layer.scaling[name]), layer.lora_dropout[name]))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        """``base(x) + sum_a scale_a * dropout_a(x) A_a^T B_a^T``."""
        out = self.base_layer(x)
        if self.adapters and self.adapters[0][0].dtype != x.dtype:
            return self._forward_cast(x, out)
        flat = out.view(-1, out.shape[-1])  # [T, out]
        for lora_a, lora_b, scale, dropout in self.adapters:
            u = torch.nn.functional.linear(dropout(x), lora_a).view(-1, lora_a.shape[0])  # [T, r]
            flat.addmm_(u, lora_b.t(), alpha=scale)
        return out

    def _forward_cast(self, x: Tensor, out: Tensor) -> Tensor:
        """PEFT's own arithmetic when the adapters' dtype differs from the activations'.

        PEFT keeps adapters in fp32 over a bf16/fp16 base (``autocast_adapter_dtype``): the product is
        computed in the adapter dtype, summed with the base output in that dtype, and cast back once
        (no in-place ``addmm_``: it would round twice).
        """
        result = out
        for lora_a, lora_b, scale, dropout in self.adapters:
            u = torch.nn.functional.linear(dropout(x.to(lora_a.dtype)), lora_a)  # [..., r]
            result = result + torch.nn.functional.linear(u, lora_b) * scale  # [..., out], adapter dtype
        return result.to(out.dtype)


@contextlib.contextmanager
def fused_lora(model: Any) -> Iterator[int]:
    """Temporarily replace each plain LoRA ``Linear`` by a :class:`FusedLoraLinear` (same outputs and gradients).

    Layers that are not plain LoRA (DoRA, LoRA bias, quantized bases) are left wrapped.

    Args:
        model: Any module; without LoRA layers this is a no-op.

    Yields:
        How many layers were swapped.
    """
    with _swapped(_lora_layers(model)[0], FusedLoraLinear) as count:
        yield count
