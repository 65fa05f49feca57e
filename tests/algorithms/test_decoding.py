"""Tests for llm_gym.algorithms.rollout.decoding: sampling filters, the lean decoding loop, LoRA swaps."""

from __future__ import annotations

import math

import pytest
import torch
from grpo_tiny import EOS, lora_config, make_agent, make_model, prompt, single_thread
from peft import LoraConfig, get_peft_model

from llm_gym.algorithms.rollout.completions import left_pad, mini_batches, pack_completions
from llm_gym.algorithms.rollout.decoding import (
    _sdpa_full_attention,
    accepts_logits_to_keep,
    base_model_only,
    decode,
    filter_logits,
    merged_lora,
    next_tokens,
    prefill,
    sample_categorical,
)

_one_thread = pytest.fixture(autouse=True)(single_thread)

EOS_IDS = list(range(0, 100, 9))  # 12 of 100 ids end a completion: some rows stop early


def _lora_model(seed: int = 0, vocab: int = 100, init_std: float = 0.3, b_std: float = 0.1):
    """A tiny PEFT model whose LoRA actually changes the output (B != 0)."""
    model = get_peft_model(make_model(seed, vocab=vocab, init_std=init_std), lora_config())
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
    return model.eval()


PROMPTS = [prompt([5, 6, 7, 8, 9]), prompt([8, 9]), prompt([10, 3, 4])]


def _batch(prompts=PROMPTS):
    ids, attention, _ = left_pad(prompts, EOS)
    return ids, attention


# ------------------------------------------------------------------ filters and sampling
def test_filter_logits_top_k_and_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    out = filter_logits(logits, temperature=2.0, top_k=2)
    assert out[0, :2].tolist() == [-math.inf, -math.inf]
    assert out[0, 2:].tolist() == [1.0, 1.5]  # divided by the temperature
    assert torch.equal(filter_logits(logits, top_k=0), logits)  # 0 = off
    assert torch.equal(filter_logits(logits, top_k=9), logits)  # k >= V keeps everything


def test_filter_logits_top_p_keeps_smallest_set_reaching_p():
    logits = torch.tensor([[0.05, 0.15, 0.3, 0.5]]).log()
    # ascending cumulative mass: .05 .20 .50 1.0; top_p 0.6 drops the tail with mass <= 0.4
    kept = torch.isfinite(filter_logits(logits, top_p=0.6))[0].tolist()
    assert kept == [False, False, True, True]
    assert torch.isfinite(filter_logits(logits, top_p=0.45))[0].tolist() == [False, False, False, True]
    assert torch.isfinite(filter_logits(logits, top_p=0.01))[0].tolist() == [False, False, False, True]


def test_filter_logits_rejects_bad_settings():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        filter_logits(x, temperature=0.0)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        filter_logits(x, top_k=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        filter_logits(x, top_p=1.5)


def _assert_frequencies(draws: torch.Tensor, probs: torch.Tensor) -> None:
    """Each token's frequency within 5 binomial standard deviations of its probability."""
    n = draws.numel()
    counts = torch.bincount(draws, minlength=probs.numel()).double()
    for token, p in enumerate(probs.double().tolist()):
        if p == 0.0:
            assert counts[token] == 0, f"token {token} has probability 0 but was drawn {int(counts[token])} times"
            continue
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(counts[token] / n - p) <= 5 * sigma + 1e-12, (token, counts[token] / n, p)


def test_sample_categorical_matches_probabilities_and_never_draws_zeros():
    probs = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4, 0.0])
    gen = torch.Generator().manual_seed(0)
    draws = sample_categorical(probs.expand(20_000, -1), generator=gen)
    _assert_frequencies(draws, probs)
    # unnormalised weights give the same distribution
    draws = sample_categorical(3.0 * probs.expand(20_000, -1), generator=gen)
    _assert_frequencies(draws, probs)


def test_next_tokens_top_k_one_is_greedy():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(next_tokens(logits, greedy=False, top_k=1), next_tokens(logits, greedy=True))


@pytest.mark.parametrize(("top_k", "top_p", "temperature"), [(0, 1.0, 1.0), (3, 1.0, 1.0), (0, 0.7, 0.5)])
def test_one_step_decode_frequencies_follow_the_filtered_softmax(top_k, top_p, temperature):
    # Vocabulary of 8, spread-out logits; 6000 samples of the first token of one prompt.
    model = make_model(seed=2, vocab=8, init_std=1.0)
    ids, attention = _batch([prompt([3, 5, 1])])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]  # [8]
        probs = filter_logits(logits[None], temperature, top_k, top_p).softmax(-1)[0]
        torch.manual_seed(0)
        out = decode(model, ids, attention, group_size=6000, max_new_tokens=1, eos_token_ids=[EOS],
                     pad_token_id=EOS, temperature=temperature, top_k=top_k, top_p=top_p)  # fmt: skip
    assert out.shape == (6000, 1)
    expected_kept = {(0, 1.0, 1.0): 8, (3, 1.0, 1.0): 3}.get((top_k, top_p, temperature))
    if expected_kept is not None:
        assert int((probs > 0).sum()) == expected_kept
    _assert_frequencies(out[:, 0], probs)


# ----------------------------------------------------------------------- decoding loop
@pytest.mark.parametrize("merge", [False, True])
def test_greedy_decode_equals_generate(merge):
    model = _lora_model()
    ids, attention = _batch()
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=12, do_sample=False,
                             pad_token_id=EOS, eos_token_id=EOS_IDS)[:, ids.shape[1] :]  # fmt: skip
        with merged_lora(model) if merge else torch.no_grad():
            out = decode(model, ids, attention, group_size=1, max_new_tokens=12, eos_token_ids=EOS_IDS,
                         pad_token_id=EOS, greedy=True)  # fmt: skip
    # generate keeps decoding finished rows with padding; the lean loop stops at the longest row
    assert out.shape[1] <= ref.shape[1]
    assert torch.equal(out, ref[:, : out.shape[1]])
    assert (ref[:, out.shape[1] :] == EOS).all()
    lengths = [next((j + 1 for j, t in enumerate(row) if t in EOS_IDS), 12) for row in ref.tolist()]
    assert min(lengths) < 12  # an early EOS is exercised


def test_greedy_decode_equals_generate_with_eager_attention():
    base = make_model(init_std=0.3)
    base.config._attn_implementation = "eager"  # the loop then lets the model build its own masks
    assert _sdpa_full_attention(make_model()) and not _sdpa_full_attention(base)
    model = get_peft_model(base, lora_config()).eval()
    ids, attention = _batch()
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=8, do_sample=False,
                             pad_token_id=EOS, eos_token_id=EOS_IDS)[:, ids.shape[1] :]  # fmt: skip
        out = decode(model, ids, attention, group_size=1, max_new_tokens=8, eos_token_ids=EOS_IDS,
                     pad_token_id=EOS, greedy=True)  # fmt: skip
    assert torch.equal(out, ref[:, : out.shape[1]])


def test_greedy_decode_equals_generate_on_llama():
    # Llama builds its mask with create_causal_mask directly (no per-layer-type dict): the ready
    # 4-D key mask of the decoding step must pass through it unchanged.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, initializer_range=0.3, pad_token_id=EOS,
                         eos_token_id=EOS, bos_token_id=EOS)  # fmt: skip
    base = LlamaForCausalLM(config).eval()
    assert _sdpa_full_attention(base)
    model = get_peft_model(base, lora_config()).eval()
    ids, attention = _batch()
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=8, do_sample=False,
                             pad_token_id=EOS, eos_token_id=EOS_IDS)[:, ids.shape[1] :]  # fmt: skip
        with merged_lora(model):
            out = decode(model, ids, attention, group_size=1, max_new_tokens=8, eos_token_ids=EOS_IDS,
                         pad_token_id=EOS, greedy=True)  # fmt: skip
    assert torch.equal(out, ref[:, : out.shape[1]])


def test_decode_variants_agree_and_pad_after_eos():
    model = _lora_model()
    ids, attention = _batch()
    kwargs = dict(group_size=3, max_new_tokens=10, eos_token_ids=EOS_IDS, pad_token_id=EOS, greedy=True)
    with torch.no_grad():
        outs = [decode(model, ids, attention, share_prefill=s, drop_finished=d, **kwargs)
                for s in (True, False) for d in (True, False)]  # fmt: skip
        single = decode(model, ids, attention, **{**kwargs, "group_size": 1})
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    assert torch.equal(outs[0], single.repeat_interleave(3, dim=0))  # prompt-major rows
    for row in outs[0].tolist():
        stop = next((j for j, t in enumerate(row) if t in EOS_IDS), None)
        if stop is not None:
            assert all(t == EOS for t in row[stop + 1 :])


def test_sampling_is_reproducible_with_a_seed():
    model = _lora_model()
    ids, attention = _batch()
    kwargs = dict(group_size=4, max_new_tokens=8, eos_token_ids=EOS_IDS, pad_token_id=EOS)
    with torch.no_grad():
        torch.manual_seed(11)
        first = decode(model, ids, attention, **kwargs)
        torch.manual_seed(11)
        second = decode(model, ids, attention, **kwargs)
        torch.manual_seed(12)
        other = decode(model, ids, attention, **kwargs)
        greedy = decode(model, ids, attention, **{**kwargs, "greedy": True})
        top1 = decode(model, ids, attention, top_k=1, **kwargs)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert torch.equal(top1, greedy)


def test_finished_rows_leave_the_batch():
    model = _lora_model()
    ids, attention = _batch()
    sizes = []
    hook = model.get_base_model().model.embed_tokens.register_forward_hook(
        lambda module, args, output: sizes.append(args[0].shape[0]))  # fmt: skip
    try:
        with torch.no_grad():
            out = decode(model, ids, attention, group_size=4, max_new_tokens=12, eos_token_ids=EOS_IDS,
                         pad_token_id=EOS, greedy=True)  # fmt: skip
    finally:
        hook.remove()
    is_eos = torch.isin(out, torch.tensor(EOS_IDS))
    live_before = [int((~is_eos[:, :t].any(dim=1)).sum()) for t in range(1, out.shape[1])]
    assert sizes[0] == 3  # one prefill row per prompt (shared across the group)
    assert sizes[1:] == live_before  # each step runs only the rows still without EOS
    assert sizes[-1] < 12


def test_decode_rejects_empty_budget():
    model = _lora_model()
    ids, attention = _batch()
    with pytest.raises(ValueError, match="max_new_tokens and group_size must be >= 1, got 0 and 2"):
        decode(model, ids, attention, group_size=2, max_new_tokens=0, eos_token_ids=[EOS], pad_token_id=EOS)


def test_shared_prefill_gives_the_same_first_logits_and_cache():
    model = _lora_model()
    ids, attention = _batch()
    with torch.no_grad():
        cache_s, logits_s, att_s, last_s = prefill(model, ids, attention, 4, share=True)
        cache_u, logits_u, att_u, last_u = prefill(model, ids, attention, 4, share=False)
    assert logits_s.shape == (12, 100)
    torch.testing.assert_close(logits_s, logits_u, atol=1e-5, rtol=0)
    assert torch.equal(att_s, att_u) and torch.equal(last_s, last_u)
    assert last_s[:, 0].tolist() == [4] * 4 + [1] * 4 + [2] * 4  # prompt length - 1
    for layer_s, layer_u in zip(cache_s.layers, cache_u.layers, strict=True):
        torch.testing.assert_close(layer_s.keys, layer_u.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer_s.values, layer_u.values, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ LoRA swaps
def _logits(model, ids, attention):
    return model(input_ids=ids, attention_mask=attention).logits


def test_merged_lora_matches_adapter_and_restores_the_model():
    model = _lora_model()
    ids, attention = _batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    modules = [type(m) for m in model.modules()]
    with torch.no_grad():
        wrapped = _logits(model, ids, attention)
        with merged_lora(model) as swapped:
            merged = _logits(model, ids, attention)
            assert swapped == 14  # 2 layers x (q, k, v, o, gate, up, down)
        with model.disable_adapter(), merged_lora(model):
            base_merged = _logits(model, ids, attention)
        with model.disable_adapter():
            base = _logits(model, ids, attention)
    torch.testing.assert_close(merged, wrapped, atol=1e-5, rtol=0)
    assert (merged - base).abs().max() > 1e-2  # the adapter matters in this model
    torch.testing.assert_close(base_merged, base, atol=1e-6, rtol=0)
    assert [type(m) for m in model.modules()] == modules
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_merged_lora_uses_the_active_adapter_of_a_shared_model():
    # A population shares one base model with one adapter per agent: the merge follows set_adapter.
    model = _lora_model()
    model.add_adapter("other", lora_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.other" in name:
                p.normal_(0, 0.1)
    ids, attention = _batch()
    outputs = {}
    with torch.no_grad():
        for adapter in ("default", "other"):
            model.set_adapter(adapter)
            with merged_lora(model):
                outputs[adapter] = (_logits(model, ids, attention), None)
            outputs[adapter] = (outputs[adapter][0], _logits(model, ids, attention))
    for merged, wrapped in outputs.values():
        torch.testing.assert_close(merged, wrapped, atol=1e-5, rtol=0)
    assert (outputs["default"][0] - outputs["other"][0]).abs().max() > 1e-2


def test_merged_lora_restores_on_error():
    model = _lora_model()
    modules = [type(m) for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"), merged_lora(model):
        raise RuntimeError("boom")
    assert [type(m) for m in model.modules()] == modules


def test_base_model_only_equals_disable_adapter():
    model = _lora_model()
    ids, attention = _batch()
    with torch.no_grad():
        with model.disable_adapter():
            expected = _logits(model, ids, attention)
        with base_model_only(model):
            got = _logits(model, ids, attention)
            assert not any(hasattr(m, "lora_A") for m in model.modules())  # no LoRA wrapper left
        after = _logits(model, ids, attention)
    assert torch.equal(got, expected)
    assert (after - expected).abs().max() > 1e-2  # adapters are back


def test_base_model_only_falls_back_with_modules_to_save():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(make_model(init_std=0.3), config).eval()
    head = model.get_base_model().lm_head
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(0.5)  # the saved copy differs from the original
        ids, attention = _batch()
        with model.disable_adapter():
            expected = _logits(model, ids, attention)
        with base_model_only(model):
            got = _logits(model, ids, attention)
    assert torch.equal(got, expected)


def test_accepts_logits_to_keep():
    assert accepts_logits_to_keep(_lora_model())
    assert accepts_logits_to_keep(make_model())

    class NoKeep(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    assert not accepts_logits_to_keep(NoKeep())


# ------------------------------------------------------------- log-probs used in learn
def test_learn_log_probs_unchanged_by_logits_to_keep_and_base_swap():
    agent = make_agent(make_model(init_std=0.3))
    with torch.no_grad():
        for name, p in agent.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids, masks = agent.get_action([prompt([5, 6, 7, 8]), prompt([9, 10])])
    packed = pack_completions(ids, masks, agent.group_size, EOS)
    (mb,) = mini_batches(packed, 64)
    agent.model.eval()
    with torch.no_grad():
        full = agent.model(input_ids=mb.ids, attention_mask=mb.attention).logits[:, mb.first : -1]
        expected = torch.log_softmax(full, -1).gather(-1, mb.ids[:, mb.first + 1 :, None])[..., 0]
        got, _ = agent._logps(mb)
        with agent.model.disable_adapter():
            ref_full = agent.model(input_ids=mb.ids, attention_mask=mb.attention).logits[:, mb.first : -1]
        ref_expected = torch.log_softmax(ref_full, -1).gather(-1, mb.ids[:, mb.first + 1 :, None])[..., 0]
    (ref_got,) = agent._frozen_logps([mb], reference=True)
    assert got.shape == expected.shape == ref_got.shape == mb.mask.shape
    # Equal on every completion token (the only ones the loss reads); finite on the padding too,
    # which the update now runs without a padding mask (right padding under the causal mask).
    # 1e-5: fp32 sums in another order (shared-prompt KV, fused LoRA) differ by ~2e-6 on AVX2 kernels.
    torch.testing.assert_close(got[mb.mask], expected[mb.mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_got[mb.mask], ref_expected[mb.mask], atol=1e-5, rtol=0)
    assert torch.isfinite(got).all() and torch.isfinite(ref_got).all()
    assert (~mb.mask).any()  # padding positions exist in this batch
    assert (got - ref_got)[mb.mask].abs().max() > 1e-3  # policy and reference really differ
