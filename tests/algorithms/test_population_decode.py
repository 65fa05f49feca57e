"""Tests for a population's batched decode: per-row LoRA, per-agent sampling, agreement with each agent alone."""

from __future__ import annotations

import pytest
import torch
from grpo_tiny import EOS, lora_config, make_agent, make_model, prompt, single_thread
from peft import LoraConfig, get_peft_model

from llm_gym.algorithms.grpo.population import population_fitness
from llm_gym.algorithms.rollout.backend import SamplingConfig
from llm_gym.algorithms.rollout.completions import left_pad
from llm_gym.algorithms.rollout.decoding import decode, merged_lora
from llm_gym.algorithms.rollout.population import batched_population, population_generate, population_rollouts
from llm_gym.algorithms.rollout.population_decode import (
    DecodeRequest,
    RowLoraLinear,
    decode_population,
    row_adapters,
    supports_row_adapters,
)

_one_thread = pytest.fixture(autouse=True)(single_thread)

EOS_IDS = list(range(0, 100, 9))  # 12 of 100 ids end a completion: some rows stop early
PROMPTS = [prompt([5, 6, 7, 8, 9]), prompt([8, 9]), prompt([10, 3, 4])]
ADAPTERS = ("a0", "a1", "a2")


@pytest.fixture(params=["stacked", "runs"])
def row_mode(request, monkeypatch):
    """Both ways a RowLoraLinear adds the adapters: stacked (small layers) and one run per adapter."""
    import llm_gym.algorithms.rollout.population_decode as population_decode

    if request.param == "runs":
        monkeypatch.setattr(population_decode, "STACK_MAX_WEIGHTS", 0)
    return request.param


def _randomise_lora_b(model, seed: int, std: float = 0.1) -> None:
    """Give every adapter its own non-zero B, so the adapters (and hence the agents) differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _three_adapter_model():
    model = get_peft_model(make_model(0, init_std=0.3), lora_config(), adapter_name="a0")
    for name in ADAPTERS[1:]:
        model.add_adapter(name, lora_config())
    _randomise_lora_b(model, seed=1)
    return model.eval()


def _teacher_forced_logps(model, adapter, input_ids, attention, generated, group):
    """Log-probs of ``generated`` under ``adapter`` alone: a plain PEFT forward over prompt + completion."""
    model.set_adapter(adapter)
    full = torch.cat([input_ids.repeat_interleave(group, 0), generated], dim=1)  # [P*G, L + C]
    mask = torch.cat([attention.repeat_interleave(group, 0), torch.ones_like(generated)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=mask, position_ids=positions).logits.float()
    width = input_ids.shape[1]
    # logits at position t predict token t + 1: the completion's tokens are predicted from width - 1 on
    return logits[:, width - 1 : -1].log_softmax(-1).gather(2, generated[..., None]).squeeze(-1)  # [P*G, C]


def _up_to_first_eos(generated):
    is_eos = torch.isin(generated, torch.tensor(EOS_IDS))
    return (is_eos.long().cumsum(1) - is_eos.long()) == 0  # True up to and including the first EOS


def test_row_lora_linear_adds_each_rows_own_adapter(row_mode):
    model = _three_adapter_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj  # a PEFT LoRA Linear, 32 -> 32
    from llm_gym.algorithms.rollout.population_decode import RowPlan

    plan = RowPlan()
    row = RowLoraLinear(layer, ["a2", "a0"], plan)
    assert (row.stacked is not None) == (row_mode == "stacked")
    plan.set_counts([2, 1], adapter_of=[0, 1])  # rows 0-1: "a2", row 2: "a0"
    x = torch.randn(3, 4, 32)  # [B, T, in]
    with torch.no_grad():
        got = row(x)

        def own(adapter, xs):  # base(x) + scale * x A^T B^T, in float64
            a, b = layer.lora_A[adapter].weight.double(), layer.lora_B[adapter].weight.double()
            w, bias = layer.base_layer.weight.double(), layer.base_layer.bias
            base = xs.double() @ w.T + (0 if bias is None else bias.double())
            return base + layer.scaling[adapter] * (xs.double() @ a.T) @ b.T

    assert layer.scaling["a2"] == 2.0  # lora_alpha 8 / r 4
    torch.testing.assert_close(got[:2].double(), own("a2", x[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[2:].double(), own("a0", x[2:]), atol=1e-5, rtol=0)
    assert not torch.allclose(own("a2", x[2:]), own("a0", x[2:]), atol=1e-3)  # the adapters do differ


def test_population_decode_logprobs_match_each_agents_own_model_to_1e5(row_mode):
    model = _three_adapter_model()
    ids, attention, _ = left_pad(PROMPTS, EOS)
    requests = [  # sampling settings differ between agents, as evolved genes do
        DecodeRequest("a0", ids, attention, SamplingConfig(group_size=2, max_new_tokens=5, temperature=0.7, top_p=0.9)),
        DecodeRequest("a1", ids, attention, SamplingConfig(group_size=3, max_new_tokens=8, top_k=20)),
        DecodeRequest("a2", ids, attention, SamplingConfig(group_size=1, max_new_tokens=3, greedy=True)),
    ]
    torch.manual_seed(0)
    with torch.no_grad():
        generated, logps = decode_population(model, requests, eos_token_ids=EOS_IDS, pad_token_id=EOS,
                                             return_logprobs=True)  # fmt: skip
    for request, out, lp in zip(requests, generated, logps, strict=True):
        group, budget = request.sampling.group_size, request.sampling.max_new_tokens
        assert out.shape[0] == len(PROMPTS) * group and 1 <= out.shape[1] <= budget
        assert lp.shape == out.shape
        ref = _teacher_forced_logps(model, request.adapter, ids, attention, out, group)
        valid = _up_to_first_eos(out)
        assert (ref - lp)[valid].abs().max() < 1e-5
        assert (lp[~valid] == 0).all()  # nothing recorded after a row's end


def test_greedy_population_decode_gives_each_adapters_single_agent_tokens(row_mode):
    model = _three_adapter_model()
    ids, attention, _ = left_pad(PROMPTS, EOS)
    budgets = {"a0": 7, "a1": 4, "a2": 10}
    requests = [DecodeRequest(a, ids, attention, SamplingConfig(group_size=1, max_new_tokens=budgets[a], greedy=True))
                for a in ADAPTERS]  # fmt: skip
    with torch.no_grad():
        together = decode_population(model, requests, eos_token_ids=EOS_IDS, pad_token_id=EOS)
        for adapter, out in zip(ADAPTERS, together, strict=True):
            model.set_adapter(adapter)
            with merged_lora(model):  # the single-agent path
                alone = decode(model, ids, attention, group_size=1, max_new_tokens=budgets[adapter],
                               eos_token_ids=EOS_IDS, pad_token_id=EOS, greedy=True)  # fmt: skip
            assert torch.equal(out, alone), adapter
    assert not torch.equal(together[0][:, :4], together[1][:, :4])  # the adapters decode differently


def test_row_adapters_restore_the_layers_and_refuse_dora():
    model = _three_adapter_model()
    before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"), row_adapters(model, ["a0", "a1"]) as plan:
        assert any(isinstance(m, RowLoraLinear) for m in model.modules()) and plan.segments == []
        raise RuntimeError("boom")
    assert [type(m).__name__ for m in model.modules()] == before
    assert not supports_row_adapters(model, ["a0", "nope"])
    dora = get_peft_model(make_model(0), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert not supports_row_adapters(dora, ["default"])
    with pytest.raises(ValueError, match="plain LoRA Linear"), row_adapters(dora, ["default"]):
        pass


def _population(size=3, **kwargs):
    first = make_agent(adapter_name="agent0", **kwargs)
    agents = [first] + [first.clone(index=i) for i in range(1, size)]
    _randomise_lora_b(first.model, seed=3)
    return agents


def test_chunks_group_consecutive_agents_up_to_the_row_cap():
    from llm_gym.algorithms.rollout.population import _chunks

    # rows 32, 32, 96, 200, 8: 32 + 32 fit 64; 96 alone (32 + 32 + 96 > 128? with cap 128: 64 + 96 = 160 > 128)
    assert _chunks([32, 32, 96, 200, 8], 128) == [[0, 1], [2], [3], [4]]
    assert _chunks([32, 32, 32, 32, 32], 128) == [[0, 1, 2, 3], [4]]
    assert _chunks([32, 32, 96], None) == [[0, 1, 2]]


@pytest.mark.parametrize("max_rows", [None, 6, 3])  # 3 prompts x 1 greedy row: all together, 2 + 1, 1 + 1 + 1
def test_population_generate_equals_each_agents_get_action_when_greedy(max_rows):
    agents = _population()
    assert batched_population(agents)
    together = population_generate(agents, PROMPTS, training=False, max_rows=max_rows)
    for agent, (ids, masks) in zip(agents, together, strict=True):
        alone_ids, alone_masks = agent.get_action(PROMPTS, training=False)
        for a, b in zip(ids, alone_ids, strict=True):
            assert torch.equal(a, b)
        for a, b in zip(masks, alone_masks, strict=True):
            assert torch.equal(a, b)


def test_population_generate_uses_each_agents_group_size_and_budget():
    agents = _population()
    agents[1].set_hp("group_size", 3)
    agents[2].set_hp("max_output_tokens", 2)
    agents[2].set_hp("temperature", 0.5)
    out = population_generate(agents, PROMPTS, training=True)
    for agent, (ids, masks) in zip(agents, out, strict=True):
        for p, i, m in zip(PROMPTS, ids, masks, strict=True):
            length = p["input_ids"].shape[1]
            assert i.shape[0] == agent.hps.group_size and m.shape == (i.shape[0], i.shape[1] - 1)
            assert torch.equal(i[:, :length], p["input_ids"].expand(i.shape[0], -1))
            assert int(m.sum(dim=1).max()) <= agent.hps.max_output_tokens
    assert max(int(m.sum(dim=1).max()) for m in out[0][1]) > 2  # agent 0 is not held to agent 2's budget


def test_single_agent_or_generate_backend_is_not_batched():
    agents = _population(size=2)
    assert not batched_population(agents[:1])  # one agent keeps the merged-weight path
    agents[1].backend.use_generate = True
    assert not batched_population(agents)
    assert population_rollouts(agents, env=None, prompts=PROMPTS) is None


def test_population_fitness_equals_each_agents_own_test():
    from transformers import AutoTokenizer

    from llm_gym.reasoning_gym import ReasoningGym
    from llm_gym.tiny import tiny_model_path

    path = str(tiny_model_path("tiny"))
    tok = AutoTokenizer.from_pretrained(path)
    env = ReasoningGym.from_task("llm_gym/Countdown-v0", tok, train_size=8, test_size=4, data_batch_size_per_gpu=2,
                                 seed=0, reward_fn=lambda completion, answer, question: len(completion) / 40)  # fmt: skip
    first = make_agent(path, pad_token_id=tok.pad_token_id, adapter_name="agent0", max_output_tokens=8)
    agents = [first, first.clone(index=1)]
    _randomise_lora_b(first.model, seed=5, std=0.5)
    scores = population_fitness(agents, env, max_problems=4)
    together = [dict(a.last_eval) for a in agents]
    alone = [a.test(env, max_problems=4) for a in agents]
    assert scores == pytest.approx(alone, abs=1e-9)
    for agent, metrics in zip(agents, together, strict=True):
        assert metrics == pytest.approx(agent.last_eval, abs=1e-9) and metrics["problems"] == 4.0
        assert agent.fitness[-2:] == pytest.approx([agent.fitness[-1]] * 2)
    assert together[0]["reward/total"] != together[1]["reward/total"]  # the agents answered differently
