"""A population on one vLLM engine (the stand-in of test_vllm_backend): sizing, one generate call, re-syncs, TIS."""

from __future__ import annotations

import math

import pytest
import torch
from grpo_tiny import EOS, lora_config, prompt, single_thread
from test_vllm_backend import _FakeLLM, _named_model, _vllm_agent, fake_vllm  # noqa: F401 - the stand-in vLLM

from llm_gym.algorithms.grpo.population import create_population
from llm_gym.algorithms.rollout.population import population_generate, shared_backend
from llm_gym.algorithms.rollout.vllm import VLLMConfig

_one_thread = pytest.fixture(autouse=True)(single_thread)


def _population(size, config=None, **kwargs):
    options = dict(actor_network=_named_model(), pad_token_id=EOS, lora_config=lora_config(), batch_size=64,
                   group_size=2, max_output_tokens=6, max_model_len=64, lr=1e-2, device="cpu", seed=0,
                   use_vllm=True, vllm_config=config or VLLMConfig())  # fmt: skip
    return create_population(size, **{**options, **kwargs})


# ------------------------------------------------------------------ max_cpu_loras from the population
def test_engine_caches_every_agents_adapter_in_cpu_memory(fake_vllm):  # noqa: F811
    pop = _population(10)
    assert pop[0].backend.llm.kwargs["max_cpu_loras"] == 10  # above the default of 8: one slot per agent
    assert all(a.backend is pop[0].backend for a in pop)  # one engine for the population
    assert _population(3)[0].backend.llm.kwargs["max_cpu_loras"] == 8  # the default floor
    assert _population(3, VLLMConfig(max_cpu_loras=5))[0].backend.llm.kwargs["max_cpu_loras"] == 5


def test_too_small_max_cpu_loras_is_refused_with_the_fix(fake_vllm):  # noqa: F811
    with pytest.raises(ValueError, match=r"^max_cpu_loras=2 is below the population size 4: set "
                                         r"VLLMConfig\(max_cpu_loras>=4\), or None to size it from the population$"):
        _population(4, VLLMConfig(max_cpu_loras=2))
    assert _FakeLLM.instances == []  # refused before any engine was built


# ---------------------------------------------------------------------------- one generate call
def test_population_is_served_by_one_generate_call_with_each_agents_adapter(fake_vllm):  # noqa: F811
    pop = _population(2, VLLMConfig(max_loras=2))
    pop[1].set_hp("temperature", 0.7)
    pop[1].set_hp("max_output_tokens", 3)
    assert shared_backend(pop) is pop[0].backend
    llm = pop[0].backend.llm
    prompts = [prompt([5, 6]), prompt([7])]
    (ids0, masks0), (ids1, masks1) = population_generate(pop, prompts)
    assert [e[0] for e in llm.events] == ["generate"]  # ONE call for the whole population
    _, sent, params, loras = llm.events[0]
    assert len(sent) == 4 and [r.lora_int_id for r in loras] == [1, 1, 2, 2]  # per prompt its agent's adapter
    assert [p.kwargs["temperature"] for p in params] == [1.0, 1.0, 0.7, 0.7]
    assert [p.kwargs["max_tokens"] for p in params] == [6, 6, 3, 3]
    # the stand-in's tokens are 20 + prompt index in the call + 10 * (lora id - 1): [7] is prompt 1 of agent 0
    # (adapter 1: 21) and prompt 3 of agent 1 (adapter 2: 33), so each agent's rows came from its own adapter
    assert ids0[1].tolist() == [[7, 0, 0], [7, 21, 0]] and ids1[1].tolist() == [[7, 0, 0], [7, 33, 0]]
    assert [tuple(m.shape) for m in masks0 + masks1] == [(2, 3), (2, 2), (2, 3), (2, 2)]


def test_population_rollouts_fall_back_when_agents_do_not_share_the_engine(fake_vllm):  # noqa: F811
    pop = _population(2)
    assert shared_backend(pop[:1]) is None  # one agent: its own get_action
    other = _vllm_agent()
    assert shared_backend([pop[0], other]) is None  # two engines (two models)
    other.close()


# ------------------------------------------------------------------- adapters edited out of band
def test_adapter_written_through_param_data_is_resynced(fake_vllm):  # noqa: F811
    agent = _vllm_agent()
    prompts = [prompt([5, 6])]
    agent.get_action(prompts)
    engine = agent.backend.llm.llm_engine
    lora_b = next(p for n, p in agent.model.named_parameters() if "lora_B.default" in n)
    version = lora_b._version
    lora_b.data[0, 0] = 0.25  # e.g. SFT or a hand edit through .data: torch's version counter does not move
    assert lora_b._version == version and agent._weights_dirty is False
    agent.get_action(prompts)
    assert engine.loaded == [1, 2] and agent.backend.llm.removed == [1]  # a new adapter id was loaded
    assert agent.backend.llm.events[-1][3].lora_int_id == 2  # and generated with
    agent.get_action(prompts)
    assert engine.loaded == [1, 2]  # unchanged since: no reload
    lora_b.data.copy_(lora_b.data.flip(0))  # same values, other places: still a change
    agent.get_action(prompts)
    assert engine.loaded == [1, 2, 3]


# ------------------------------------------------------------------- truncated importance sampling
def test_importance_sampling_weights_the_loss_with_the_engines_logprobs(fake_vllm):  # noqa: F811
    cap = 3.0
    agent = _vllm_agent(vllm_importance_sampling_correction=True, vllm_importance_sampling_cap=cap, beta=0.0)
    assert agent.backend.config.logprobs is True  # the flag asks the engine for the sampled tokens' log-probs
    ids, masks = agent.get_action([prompt([5, 6, 7]), prompt([8, 9])])
    engine_logps = agent.backend.last_logprobs[0]
    # the trainer's log-probs of the same tokens under the policy that sampled them (update_epochs=1: logp itself)
    from llm_gym.algorithms.rollout.completions import mini_batches, pack_completions

    mb = mini_batches(pack_completions(ids, masks, agent.group_size, EOS), 64)[0]
    (trainer,) = agent._frozen_logps([mb], reference=False)
    rows = torch.zeros(mb.mask.shape[0], mb.mask.shape[1] + mb.first)
    for b, r in enumerate(r for lp in engine_logps for r in lp):
        rows[b, : r.shape[0]] = r
    rows = rows[:, mb.first :]
    weights = torch.exp(trainer - rows).clamp(max=cap)[mb.mask]
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # no zero advantage: every row is trained on
    metrics = agent.learn((ids, masks, rewards))
    assert metrics["grpo/is_ratio_mean"] == pytest.approx(float(weights.mean()), rel=1e-5)
    assert agent._sampling_logps == {}  # used once, then forgotten
    metrics = agent.learn((ids, masks, rewards))  # the same experience again: its log-probs are gone
    assert "grpo/is_ratio_mean" not in metrics


def test_importance_sampling_stays_off_by_default_and_for_evaluation(fake_vllm):  # noqa: F811
    agent = _vllm_agent()
    assert agent.hps.vllm_importance_sampling_correction is False and agent.hps.vllm_importance_sampling_cap == 2.0
    ids, masks = agent.get_action([prompt([5, 6])])
    assert "grpo/is_ratio_mean" not in agent.learn((ids, masks, torch.tensor([[1.0, 0.0, 0.0]])))
    corrected = _vllm_agent(vllm_importance_sampling_correction=True)
    corrected.get_action([prompt([5, 6])], training=False)
    assert corrected._sampling_logps == {}  # greedy evaluation is not trained on
    with pytest.raises(ValueError, match="vllm_importance_sampling_correction is fixed when the agent is built"):
        corrected.set_hp("vllm_importance_sampling_correction", False)
    with pytest.raises(ValueError, match=r"vllm_importance_sampling_cap=0.0 is invalid: it must be > 0"):
        corrected.set_hp("vllm_importance_sampling_cap", 0.0)


def test_population_rollout_keeps_each_agents_engine_logprobs(fake_vllm):  # noqa: F811
    pop = _population(2, vllm_importance_sampling_correction=True)
    (ids0, masks0), (ids1, _) = population_generate(pop, [prompt([5, 6])])
    for agent, ids, logps in zip(pop, (ids0, ids1), pop[0].backend.last_logprobs, strict=True):
        kept = agent.sampling_logps_for(ids)
        assert kept is not None and kept[0] is logps[0]
    assert pop[0].sampling_logps_for(ids1) is None  # each agent keeps only its own rows
    assert math.isfinite(pop[0].learn((ids0, masks0, torch.tensor([[1.0, 0.0]])))["grpo/is_ratio_mean"])
