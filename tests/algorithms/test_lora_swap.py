"""Tests for llm_gym.algorithms.lora_swap.fused_lora: the policy pass with LoRA inside addmm_."""

from __future__ import annotations

import contextlib

import pytest
import torch
from grpo_tiny import make_model, single_thread
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from llm_gym.algorithms.plumbing.lora_swap import FusedLoraLinear, fused_lora

_one_thread = pytest.fixture(autouse=True)(single_thread)


def _peft(dropout: float, use_dora: bool = False):
    config = LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules="all-linear",
                        task_type="CAUSAL_LM", use_dora=use_dora)  # fmt: skip
    model = get_peft_model(make_model(init_std=0.3), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 at init would hide a wrong scale
    return model.train()


def _run(model, fused: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # same dropout masks in both runs
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    with fused_lora(model) if fused else contextlib.nullcontext() as swapped:
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, swapped


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_fused_lora_gives_peft_outputs_and_gradients(dropout):
    model = _peft(dropout)
    plain_logits, plain_grads, _ = _run(model, fused=False)
    fused_logits, fused_grads, swapped = _run(model, fused=True)
    assert swapped == 2 * 7  # q, k, v, o, gate, up, down in both layers
    torch.testing.assert_close(fused_logits, plain_logits, atol=1e-5, rtol=1e-5)
    assert plain_grads.keys() == fused_grads.keys() and len(plain_grads) == 28  # every A and B
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # base stays frozen


def test_fused_lora_over_a_bf16_base_with_fp32_adapters_matches_peft():
    # PEFT keeps adapters in fp32 over a bf16 base (the CUDA default): the fused path used to feed
    # bf16 activations to fp32 adapter weights and fail ("expected m1 and m2 to have the same dtype").
    config = LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(make_model(init_std=0.3).to(torch.bfloat16), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32} and model.base_model.model.lm_head.weight.dtype == torch.bfloat16
    plain_logits, plain_grads, _ = _run(model, fused=False)
    fused_logits, fused_grads, swapped = _run(model, fused=True)
    assert swapped == 14 and fused_logits.dtype == plain_logits.dtype == torch.bfloat16
    torch.testing.assert_close(fused_logits, plain_logits)  # bf16 default tolerances
    for name, grad in plain_grads.items():
        assert fused_grads[name].dtype == torch.float32
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-3, rtol=1e-2)


def test_fused_lora_restores_the_peft_layers_even_on_error():
    model = _peft(0.0)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    with pytest.raises(RuntimeError, match="boom"), fused_lora(model):
        assert sum(isinstance(m, FusedLoraLinear) for m in model.modules()) == len(layers) == 14
        raise RuntimeError("boom")
    assert {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)} == layers
    assert not any(isinstance(m, FusedLoraLinear) for m in model.modules())


def test_fused_lora_leaves_dora_layers_alone():
    model = _peft(0.0, use_dora=True)
    with fused_lora(model) as swapped:
        assert swapped == 0
