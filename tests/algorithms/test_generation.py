"""Tests for llm_gym.algorithms.rollout.backend: padding, completion splitting, budgets, the HF backend."""

from __future__ import annotations

import logging

import pytest
import torch
from grpo_tiny import EOS, lora_config, make_model, prompt, single_thread
from peft import get_peft_model

from llm_gym.algorithms.rollout.backend import SamplingConfig, generation_budget
from llm_gym.algorithms.rollout.completions import left_pad, split_completions
from llm_gym.algorithms.rollout.hf import HFGenerationBackend

_one_thread = pytest.fixture(autouse=True)(single_thread)


def test_left_pad_puts_padding_on_the_left():
    ids, attention, unpadded = left_pad([prompt([5, 6, 7]), prompt([8])], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert [u.tolist() for u in unpadded] == [[5, 6, 7], [8]]


def test_left_pad_drops_padding_given_in_the_prompt():
    p = {"input_ids": torch.tensor([[0, 0, 4, 5]]), "attention_mask": torch.tensor([[0, 0, 1, 1]])}
    _, _, unpadded = left_pad([p], pad_token_id=0)
    assert unpadded[0].tolist() == [4, 5]


def test_left_pad_rejects_empty_and_malformed_prompts():
    with pytest.raises(ValueError, match="got no prompts"):
        left_pad([], 0)
    with pytest.raises(ValueError, match="prompt 0 must be a dict with 'input_ids'"):
        left_pad(["text"], 0)
    with pytest.raises(ValueError, match=r"input_ids must be \[1, L\]"):
        left_pad([{"input_ids": torch.ones(2, 3, dtype=torch.long)}], 0)


def test_split_completions_masks_up_to_and_including_first_eos():
    # Two prompts (L = 3 and 1), G = 2, EOS = 0 = pad. Generated rows (C = 4):
    #   p0: [9, 0, 0, 0] -> 2 real tokens (9 and its EOS); [4, 4, 4, 4] -> 4 real (no EOS)
    #   p1: [0, 7, 7, 7] -> 1 real (EOS at once; what follows is junk); [3, 0, 5, 5] -> 2 real
    generated = torch.tensor([[9, 0, 0, 0], [4, 4, 4, 4], [0, 7, 7, 7], [3, 0, 5, 5]])
    out = split_completions([torch.tensor([5, 6, 7]), torch.tensor([8])], generated, 2, eos_token_ids=[0],
                            pad_token_id=0)  # fmt: skip
    assert out.completion_ids[0].tolist() == [[5, 6, 7, 9, 0, 0, 0], [5, 6, 7, 4, 4, 4, 4]]
    # mask position t is True when token t + 1 is generated: tokens 3..6 -> positions 2..5
    assert out.action_masks[0].tolist() == [
        [False, False, True, True, False, False],
        [False, False, True, True, True, True],
    ]
    # group 1 is trimmed to its longest real completion (2 tokens); junk after EOS becomes pad
    assert out.completion_ids[1].tolist() == [[8, 0, 0], [8, 3, 0]]
    assert out.action_masks[1].tolist() == [[True, False], [True, True]]


def test_split_completions_from_ragged_lists_and_several_eos_ids():
    # vLLM-style ragged rows; EOS ids {0, 2}: the first row stops at 2.
    out = split_completions([torch.tensor([1])], [[5, 2, 6], [7]], 2, eos_token_ids=[0, 2], pad_token_id=0)
    assert out.completion_ids[0].tolist() == [[1, 5, 2], [1, 7, 0]]
    assert out.action_masks[0].tolist() == [[True, True], [True, False]]


def test_split_completions_rejects_wrong_row_count():
    with pytest.raises(ValueError, match=r"got 3 generated rows for 1 prompts x group_size 2 = 2"):
        split_completions([torch.tensor([1])], torch.zeros(3, 2, dtype=torch.long), 2, eos_token_ids=[0],
                          pad_token_id=0)  # fmt: skip


def test_generation_budget_fits_cuts_and_fails(caplog):
    assert generation_budget(10, 20, None) == 20
    assert generation_budget(10, 20, 30) == 20
    with caplog.at_level(logging.WARNING):
        assert generation_budget(10, 20, 15) == 5
    assert "generating at most 5 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert generation_budget(10, 20, 15, warn=False) == 5
    assert caplog.text == ""
    with pytest.raises(ValueError, match="a prompt of 15 tokens leaves no room to generate within max_model_len=15"):
        generation_budget(15, 20, 15)


def _backend(eos=(EOS,), **kwargs):
    model = get_peft_model(make_model(), lora_config())
    return model, HFGenerationBackend(model, pad_token_id=EOS, eos_token_ids=list(eos), **kwargs)


def test_hf_backend_generate_path_one_call_for_all_prompts(monkeypatch):
    model, backend = _backend(eos=range(0, 100, 7), use_generate=True)
    calls = []
    real = model.generate

    def counting(**kwargs):
        calls.append({**kwargs, "training": model.training})
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", counting)
    model.train()
    prompts = [prompt([5, 6, 7]), prompt([8, 9]), prompt([10])]
    out = backend.generate(prompts, SamplingConfig(group_size=3, max_new_tokens=5))
    assert len(calls) == 1
    assert calls[0]["input_ids"].shape == (3, 3) and calls[0]["num_return_sequences"] == 3
    assert calls[0]["do_sample"] is True and calls[0]["max_new_tokens"] == 5
    assert calls[0]["training"] is False and calls[0]["use_cache"] is True  # no dropout, KV cache on
    eos = set(range(0, 100, 7))
    for ids, mask, p in zip(out.completion_ids, out.action_masks, prompts, strict=True):
        length = p["input_ids"].shape[1]
        assert ids.shape[0] == 3 and mask.shape == (3, ids.shape[1] - 1)
        assert torch.equal(ids[:, :length], p["input_ids"].expand(3, -1))
        assert not mask[:, : length - 1].any()
        for row, row_mask in zip(ids, mask, strict=True):
            gen = row[length:].tolist()
            stop = next((j + 1 for j, t in enumerate(gen) if t in eos), len(gen))
            assert row_mask[length - 1 :].tolist() == [j < stop for j in range(len(gen))]
            assert all(t == EOS for t in gen[stop:])  # right padding after the first EOS
    assert model.training  # the caller's mode is restored


def test_hf_backend_greedy_is_deterministic():
    model, backend = _backend()
    sampling = SamplingConfig(group_size=1, max_new_tokens=6, greedy=True)
    first = backend.generate([prompt([5, 6, 7]), prompt([8])], sampling)
    torch.manual_seed(123)  # greedy must not depend on the RNG
    second = backend.generate([prompt([5, 6, 7]), prompt([8])], sampling)
    for a, b in zip(first.completion_ids, second.completion_ids, strict=True):
        assert a.shape[0] == 1 and torch.equal(a, b)


def test_lean_backend_never_calls_generate_and_prefills_each_prompt_once(monkeypatch):
    model, backend = _backend(eos=range(0, 100, 7))
    monkeypatch.setattr(model, "generate", lambda **kwargs: pytest.fail("the lean path must not call generate"))
    calls = []
    real = model.forward

    def recording(*args, **kwargs):
        calls.append((kwargs["input_ids"].shape, model.training, torch.is_grad_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording)
    model.train()
    out = backend.generate([prompt([5, 6, 7]), prompt([8, 9]), prompt([10])], SamplingConfig(group_size=4,
                                                                                             max_new_tokens=5))
    assert calls[0][0] == (3, 3)  # prefill: one row per prompt, left-padded to 3
    assert all(shape[1] == 1 and shape[0] <= 12 for shape, _, _ in calls[1:])  # decoding steps
    assert 1 <= len(calls) - 1 <= 4  # at most max_new_tokens - 1 decoding forwards after the prefill
    assert not any(training or grad for _, training, grad in calls)  # eval mode, no autograd
    assert model.training  # the caller's mode is restored
    assert [ids.shape[0] for ids in out.completion_ids] == [4, 4, 4]


def test_lean_backend_greedy_equals_generate_backend():
    # Random LoRA B so the adapter matters; 12 EOS ids so some completions end early.
    model, lean = _backend(eos=range(0, 100, 9))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    reference = HFGenerationBackend(model, pad_token_id=EOS, eos_token_ids=list(range(0, 100, 9)), use_generate=True)
    unmerged = HFGenerationBackend(model, pad_token_id=EOS, eos_token_ids=list(range(0, 100, 9)), merge_lora=False)
    prompts = [prompt([5, 6, 7, 8, 9]), prompt([8, 9]), prompt([10, 3, 4]), prompt([40])]
    sampling = SamplingConfig(group_size=1, max_new_tokens=10, greedy=True)
    expected = reference.generate(prompts, sampling)
    for backend in (lean, unmerged):
        got = backend.generate(prompts, sampling)
        for a, b, ma, mb in zip(got.completion_ids, expected.completion_ids, got.action_masks, expected.action_masks,
                                strict=True):  # fmt: skip
            assert torch.equal(a, b) and torch.equal(ma, mb)
    lengths = [int(m.sum()) for m in expected.action_masks]
    assert min(lengths) < 10 and max(lengths) == 10  # early EOS and a full-length completion both occur
