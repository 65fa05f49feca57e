"""Tests for llm_gym.algorithms.grpo.logps: the prompt forward shared across a group."""

from __future__ import annotations

import pytest
import torch
from grpo_tiny import EOS, make_agent, make_model, prompt, single_thread

from llm_gym.algorithms.grpo.logps import completion_logps, prompt_groups
from llm_gym.algorithms.rollout.completions import MiniBatch, mini_batches, pack_completions
from llm_gym.algorithms.rollout.decoding import base_model_only

_one_thread = pytest.fixture(autouse=True)(single_thread)


def _agent_with_lora():
    agent = make_agent(make_model(init_std=0.3), max_output_tokens=8)
    with torch.no_grad():
        for name, p in agent.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return agent


def _packed(agent, prompts):
    ids, masks = agent.get_action(prompts)
    return pack_completions(ids, masks, agent.group_size, EOS)


PROMPTS = [prompt([5, 6, 7, 8, 9, 11, 12]), prompt([9, 10]), prompt([13, 14, 15, 16])]


def test_prompt_groups_by_hand():
    # Rows: prompt [5, 6] twice, then prompt [7] once; completions right-padded with 0.
    ids = torch.tensor([[5, 6, 21, 22, 0], [5, 6, 23, 0, 0], [7, 24, 25, 26, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    full_mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    mb = MiniBatch(rows=slice(0, 3), ids=ids, attention=attention, first=0, mask=full_mask)
    groups = prompt_groups(mb)
    assert groups is not None
    assert groups.group.tolist() == [0, 0, 1]
    assert groups.prompt_len.tolist() == [2, 2, 1]
    assert groups.prompt_ids.tolist() == [[5, 6], [0, 7]]  # left-padded
    assert groups.prompt_attention.tolist() == [[1, 1], [0, 1]]
    assert groups.suffix_ids.tolist() == [[21, 22, 0], [23, 0, 0], [24, 25, 26]]
    assert groups.suffix_attention.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert groups.saved_tokens == 2  # prompt [5, 6] computed once instead of twice


def test_prompt_groups_declines_when_nothing_is_shared():
    ids = torch.tensor([[5, 6, 21], [7, 8, 22]])
    mb = MiniBatch(rows=slice(0, 2), ids=ids, attention=torch.ones_like(ids), first=1,
                   mask=torch.tensor([[True], [True]]))  # fmt: skip
    assert prompt_groups(mb) is None
    # Same ids, but one row generated nothing: no prompt boundary for it, so no sharing.
    ids = torch.tensor([[5, 6, 21], [5, 6, 0]])
    mb = MiniBatch(rows=slice(0, 2), ids=ids, attention=torch.tensor([[1, 1, 1], [1, 1, 0]]), first=1,
                   mask=torch.tensor([[True], [False]]))  # fmt: skip
    assert prompt_groups(mb) is None


@pytest.mark.parametrize("batch_size", [64, 5])  # 5: mini-batches split groups mid-way
def test_shared_prompt_gives_the_plain_log_probs_entropy_and_gradients(batch_size):
    agent = _agent_with_lora()
    packed = _packed(agent, PROMPTS)
    agent.model.train()
    params = [p for p in agent.model.parameters() if p.requires_grad]
    for mb in mini_batches(packed, batch_size):
        results = {}
        for share in (False, True):
            agent.model.zero_grad(set_to_none=True)
            logp, ent = completion_logps(agent.model, mb, entropy=True, share_prompt=share)
            assert logp.shape == ent.shape == mb.mask.shape
            (logp * mb.mask).sum().backward()
            results[share] = (logp.detach(), ent, [p.grad.clone() for p in params])
        (plain, plain_ent, plain_grads), (shared, shared_ent, shared_grads) = results[False], results[True]
        torch.testing.assert_close(shared[mb.mask], plain[mb.mask], atol=1e-5, rtol=0)
        torch.testing.assert_close(shared_ent[mb.mask], plain_ent[mb.mask], atol=1e-5, rtol=0)
        for got, want in zip(shared_grads, plain_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert any(g.abs().max() > 1e-3 for g in plain_grads)  # the gradients are not trivially zero


def test_shared_reference_pass_matches_plain_and_differs_from_policy():
    agent = _agent_with_lora()
    (mb,) = mini_batches(_packed(agent, PROMPTS), 64)
    with torch.no_grad(), base_model_only(agent.model):
        plain, _ = completion_logps(agent.model, mb, share_prompt=False)
        shared, _ = completion_logps(agent.model, mb, share_prompt=True)
    with torch.no_grad():
        policy, _ = completion_logps(agent.model, mb, share_prompt=True)
    torch.testing.assert_close(shared[mb.mask], plain[mb.mask], atol=1e-5, rtol=0)
    assert (policy - shared)[mb.mask].abs().max() > 1e-3


def test_shared_prompt_computes_each_prompt_once():
    agent = _agent_with_lora()
    (mb,) = mini_batches(_packed(agent, PROMPTS), 64)
    groups = prompt_groups(mb)
    positions = []
    embed = agent.model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda module, args, out: positions.append(args[0].numel()))
    try:
        with torch.no_grad():
            completion_logps(agent.model, mb, share_prompt=False)
            plain = sum(positions)
            positions.clear()
            completion_logps(agent.model, mb, share_prompt=True)
            shared = sum(positions)
    finally:
        handle.remove()
    rows = agent.group_size * len(PROMPTS)
    assert plain == rows * mb.ids.shape[1]
    # One left-padded row per prompt (7 tokens wide) plus every row's completion window.
    assert shared == len(PROMPTS) * 7 + rows * groups.suffix_ids.shape[1]
    assert shared < plain


@pytest.mark.parametrize("switch", ["share_prompt_forward", "fuse_lora"])
def test_learn_is_unchanged_by_the_update_optimisations(switch):
    """One full update with the optimisation off and on moves the LoRA weights to the same place."""
    prompts = PROMPTS[:2]
    weights = {}
    for share in (False, True):
        agent = _agent_with_lora()
        setattr(agent, switch, share)
        torch.manual_seed(3)
        ids, masks = agent.get_action(prompts)
        rewards = torch.arange(len(prompts) * agent.group_size, dtype=torch.float32).reshape(len(prompts), -1)
        metrics = agent.learn((ids, masks, rewards % 3))
        weights[share] = ({n: p.detach().clone() for n, p in agent.model.named_parameters() if p.requires_grad},
                          metrics)  # fmt: skip
    (plain, plain_metrics), (shared, shared_metrics) = weights[False], weights[True]
    for name, value in plain.items():
        # 5e-6: AdamW's first step divides by sqrt(v), so ~1e-7 gradient rounding (AVX2 vs AVX-512
        # kernels) reaches ~2e-6 on weights whose gradient is near zero.
        torch.testing.assert_close(shared[name], value, atol=5e-6, rtol=1e-5)
    assert shared_metrics["loss"] == pytest.approx(plain_metrics["loss"], abs=1e-6)
    assert shared_metrics["loss/kl"] == pytest.approx(plain_metrics["loss/kl"], abs=1e-6)


class _FixedLogits(torch.nn.Module):
    """A 'model' whose every position predicts the logits [2, 1, 0] (vocabulary 3)."""

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        from types import SimpleNamespace

        logits = torch.tensor([2.0, 1.0, 0.0]).expand(*input_ids.shape, 3)
        return SimpleNamespace(logits=logits)


def test_log_probs_are_scored_at_the_sampling_temperature_by_hand():
    # One row: prompt [1], completion [0, 2]. At T = 0.7 the logits [2, 1, 0] become
    # [2.857143, 1.428571, 0]; log-softmax of token 0 = -ln(1 + e^-1.428571 + e^-2.857143)
    # = -ln(1 + 0.239651 + 0.057433) = -ln(1.297084) = -0.260118, of token 2 = -2.857143 - 0.260118 = -3.117261.
    ids = torch.tensor([[1, 0, 2]])
    mb = MiniBatch(rows=slice(0, 1), ids=ids, attention=torch.ones_like(ids), first=0,
                   mask=torch.tensor([[True, True]]))  # fmt: skip
    logp, ent = completion_logps(_FixedLogits(), mb, entropy=True, share_prompt=False, temperature=0.7)
    torch.testing.assert_close(logp, torch.tensor([[-0.260118, -3.117261]]), atol=1e-5, rtol=0)
    # p = [0.770960, 0.184761, 0.044278]: entropy -sum p ln p = 0.200541 + 0.312005 + 0.138027 = 0.650573
    torch.testing.assert_close(ent, torch.tensor([[0.650573, 0.650573]]), atol=1e-5, rtol=0)
    at_one, _ = completion_logps(_FixedLogits(), mb, share_prompt=False)  # T = 1: -ln(1 + e^-1 + e^-2)
    torch.testing.assert_close(at_one, torch.tensor([[-0.407606, -2.407606]]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        completion_logps(_FixedLogits(), mb, share_prompt=False, temperature=0.0)


def test_learn_scores_policy_old_and_reference_at_the_agent_temperature():
    agent = _agent_with_lora()
    agent.set_hp("temperature", 0.7)
    (mb,) = mini_batches(_packed(agent, PROMPTS), 64)
    agent.model.eval()
    with torch.no_grad():
        full = agent.model(input_ids=mb.ids, attention_mask=mb.attention).logits[:, mb.first : -1]
        expected = torch.log_softmax(full / 0.7, -1).gather(-1, mb.ids[:, mb.first + 1 :, None])[..., 0]
        with base_model_only(agent.model):
            ref_full = agent.model(input_ids=mb.ids, attention_mask=mb.attention).logits[:, mb.first : -1]
        ref_expected = torch.log_softmax(ref_full / 0.7, -1).gather(-1, mb.ids[:, mb.first + 1 :, None])[..., 0]
        policy, _ = agent._logps(mb)
    (old,) = agent._frozen_logps([mb], reference=False)
    (ref,) = agent._frozen_logps([mb], reference=True)
    for got, want in ((policy, expected), (old, expected), (ref, ref_expected)):
        torch.testing.assert_close(got[mb.mask], want[mb.mask], atol=1e-5, rtol=0)
    untempered = torch.log_softmax(full, -1).gather(-1, mb.ids[:, mb.first + 1 :, None])[..., 0]
    assert (policy - untempered)[mb.mask].abs().max() > 1e-2  # T = 0.7 really changes the scores
