"""The "vllm-server" backend against the stand-in vLLM server (llm_gym.lora_server) over real HTTP, on the tiny model."""

from __future__ import annotations

import logging
import socket

import pytest
import torch
from grpo_tiny import EOS, make_agent, make_model, prompt, single_thread

from llm_gym.algorithms.rollout.backend import SamplingConfig
from llm_gym.algorithms.rollout.completions import mini_batches, pack_completions
from llm_gym.algorithms.rollout.vllm import AdapterBatch
from llm_gym.algorithms.rollout.vllm_server import ServerUnreachable, VLLMServerConfig
from llm_gym.chat_server import ChatServer, Reply
from llm_gym.lora_server import LoRAServer

_one_thread = pytest.fixture(autouse=True)(single_thread)

MANY_EOS = list(range(0, 100, 7))  # 15 of 100 ids end a completion, so lengths vary
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.fixture
def server():
    with LoRAServer(make_model(), name="tiny") as s:
        yield s


def _agent(server, **kwargs):
    options = {"backend": "vllm-server", "backend_config": {"base_url": server.base_url}, "eos_token_id": MANY_EOS}
    return make_agent(**{**options, **kwargs})


def _prompts():
    return [prompt(p) for p in PROMPTS]


def _learn_once(agent):
    """One update with non-constant rewards, so the adapter (lora_B starts at 0) differs from the base."""
    ids, masks = agent.get_action(_prompts())
    rewards = torch.arange(len(PROMPTS) * agent.group_size, dtype=torch.float32).reshape(len(PROMPTS), -1) % 3
    agent.learn((ids, masks, rewards))


def _trainer_logps(agent, ids, masks):
    """The trainer's temperature-1 log-probs of the completions, on its own (current) adapter."""
    batches = mini_batches(pack_completions(ids, masks, agent.group_size, EOS), 64)
    return agent._frozen_logps(batches, reference=False)[0], batches[0]


def _server_logps(agent, masks, batch):
    """The backend's last_logprobs packed like the trainer's mini-batch ([B, T] at the completion positions)."""
    rows = torch.cat([torch.nn.functional.pad(lp, (0, batch.mask.shape[1] + batch.first - lp.shape[1]))
                      for lp in agent.backend.last_logprobs[0]])  # fmt: skip
    return rows[:, batch.first :]


def test_completions_come_back_as_token_ids_with_the_adapters_log_probs(server):
    agent = _agent(server)
    _learn_once(agent)  # the served adapter is no longer the base
    ids, masks = agent.get_action(_prompts())
    body = server.bodies[-1]
    assert body["prompt"] == PROMPTS and body["n"] == 4 and body["max_tokens"] == 6
    assert body["stop_token_ids"] == MANY_EOS and body["ignore_eos"] is True and body["return_token_ids"] is True
    assert body["model"].endswith("-default-2") and body["temperature"] == 1.0 and "top_k" not in body
    assert [tuple(i.shape[1:]) for i in ids] == [(3 + c,) for c in (i.shape[1] - 3 for i in ids)]
    for p, seq, m in zip(PROMPTS, ids, masks, strict=True):
        assert seq.shape[0] == 4 and m.shape == (4, seq.shape[1] - 1)
        assert (seq[:, : len(p)] == torch.tensor(p)).all()
        assert not m[:, : len(p) - 1].any()  # prompt positions are never generated
    lengths = torch.cat([m.sum(1) for m in masks])
    assert lengths.min() < 6 <= lengths.max()  # some completions stopped on one of the EOS ids, some ran to 6
    trainer, batch = _trainer_logps(agent, ids, masks)
    served = _server_logps(agent, masks, batch)
    # the server ran the adapter it was sent, not the base and not a stale copy: equal to float rounding
    assert torch.allclose(served[batch.mask], trainer[batch.mask], atol=1e-5)


def test_greedy_equals_the_hf_backend_and_a_seed_repeats_a_sample(server):
    agent = _agent(server)
    hf = make_agent(eos_token_id=MANY_EOS)  # the same seeded base and adapter initialisation
    greedy = agent.get_action(_prompts(), training=False)[0]
    assert server.bodies[-1]["temperature"] == 0.0
    for a, b in zip(greedy, hf.get_action(_prompts(), training=False)[0], strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(7)
    first = agent.get_action(_prompts())[0]
    torch.manual_seed(7)
    second = agent.get_action(_prompts())[0]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert server.bodies[-1]["seed"] == server.bodies[-2]["seed"]
    unseeded = _agent(server, backend_config={"base_url": server.base_url, "seed_requests": False})
    unseeded.get_action(_prompts())
    assert "seed" not in server.bodies[-1]


def test_each_sync_loads_a_fresh_name_and_unloads_the_previous_one(server):
    agent = _agent(server)
    prefix = agent.backend.prefix
    agent.get_action(_prompts())
    agent.get_action(_prompts())  # unchanged adapter: no new load
    assert server.loaded == [f"{prefix}-default-1"] and server.unloaded == []
    _learn_once(agent)  # its rollout still uses name 1
    agent.get_action(_prompts())
    assert server.loaded == [f"{prefix}-default-{k}" for k in (1, 2)] and server.unloaded == [f"{prefix}-default-1"]
    assert [c["id"] for c in server.models()["data"]] == ["tiny", f"{prefix}-default-2"]
    assert [f.name for f in agent.backend._dir.iterdir()] == [f"{prefix}-default-2"]  # the old folder deleted
    agent.backend.close()
    assert server.unloaded[-1] == f"{prefix}-default-2" and not agent.backend._dir.exists()
    with pytest.raises(RuntimeError, match="this vllm-server backend was closed"):
        agent.get_action(_prompts())


def test_a_population_has_one_served_adapter_per_member(server):
    first = _agent(server, adapter_name="agent0")
    second = first.clone(index=1)
    _learn_once(second)  # the two adapters now differ
    prefix = first.backend.prefix
    assert second.backend is first.backend
    sampling = SamplingConfig(group_size=2, max_new_tokens=6)
    outs = first.backend.generate_batches([AdapterBatch(a.adapter_name, _prompts(), sampling)
                                           for a in (first, second)])  # fmt: skip
    # agent1 was served for its rollout (name 1); now agent0 is served first (2), then agent1's update (3)
    assert {b["model"] for b in server.bodies[-2:]} == {f"{prefix}-agent0-2", f"{prefix}-agent1-3"}
    for agent, out, logps in zip((first, second), outs, first.backend.last_logprobs, strict=True):
        agent._activate()
        batch = mini_batches(pack_completions(out.completion_ids, out.action_masks, 2, EOS), 64)[0]
        trainer = agent._frozen_logps([batch], reference=False)[0]
        rows = torch.cat([torch.nn.functional.pad(lp, (0, batch.mask.shape[1] + batch.first - lp.shape[1]))
                          for lp in logps])[:, batch.first :]  # fmt: skip
        assert torch.allclose(rows[batch.mask], trainer[batch.mask], atol=1e-5)
    second.release()
    first.get_action(_prompts())  # unchanged agent0; the next sync of anyone drops the released one
    _learn_once(first)
    first.get_action(_prompts())
    assert not any("agent1" in c["id"] for c in server.models()["data"])


def test_importance_sampling_against_the_server_weights_its_own_model_by_one(server):
    # The stand-in server scores with the trainer's own model and adapter: every TIS weight is exp(0) = 1 up to
    # float noise, so the weighted update equals the plain one. (A real engine's kernels drift; its weights vary.)
    agent = _agent(server, vllm_importance_sampling_correction=True, beta=0.0)
    _learn_once(agent)  # a served adapter that is not the base
    ids, masks = agent.get_action(_prompts())
    rewards = torch.arange(len(PROMPTS) * agent.group_size, dtype=torch.float32).reshape(len(PROMPTS), -1) % 3
    assert agent.learn((ids, masks, rewards))["grpo/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert "grpo/is_ratio_mean" not in _agent(server, beta=0.0).learn((ids, masks, rewards))  # off by default


def test_a_restarted_server_gets_its_adapters_back(server, caplog):
    agent = _agent(server)
    _learn_once(agent)
    torch.manual_seed(3)
    before = agent.get_action(_prompts())[0]
    served = agent.backend.served_names["default"]
    server.restart()  # up again at once, without the adapter
    caplog.set_level(logging.WARNING)
    torch.manual_seed(3)
    after = agent.get_action(_prompts())[0]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the same weights served again
    assert server.loaded[-1] != served and server.loaded[-1] == agent.backend.served_names["default"]
    assert any(f"forgot adapter {served}" in r.message for r in caplog.records)

    server.restart(down_for=1.0)  # now the next request finds no server for a second
    torch.manual_seed(3)
    again = agent.get_action(_prompts())[0]
    assert all(torch.equal(a, b) for a, b in zip(before, again, strict=True))
    assert any("does not answer" in r.message for r in caplog.records) and server.restarts == 2


def test_a_server_down_longer_than_restart_wait_fails_with_one_line(server):
    agent = _agent(server, backend_config={"base_url": server.base_url, "restart_wait": 0.3})
    agent.get_action(_prompts())
    server.close()
    with pytest.raises(ServerUnreachable, match=r"cannot reach the vLLM server at .* for 0.3 s\): check that it is "
                                                r"running, or raise VLLMServerConfig.restart_wait"):  # fmt: skip
        agent.get_action(_prompts())


# --------------------------------------------------------------------------------- bad input
def test_missing_base_url_names_the_fix():
    with pytest.raises(ValueError, match=r"backend='vllm-server' needs the server's address: backend_config="
                                         r"VLLMServerConfig\(base_url='http://HOST:8000/v1'\) for a server started "
                                         r"with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve MODEL --enable-lora"):
        make_agent(backend="vllm-server")
    with pytest.raises(ValueError, match="timeout > 0"):
        VLLMServerConfig(base_url="http://x/v1", timeout=0)
    with pytest.raises(ValueError, match=r"unknown vllm-server setting\(s\) \['url'\]; valid ones are \['adapter_dir'"):
        make_agent(backend="vllm-server", backend_config={"url": "http://x/v1"})


def test_a_base_url_that_is_not_the_api_root_names_the_fix(server):
    root = server.base_url.removesuffix("/v1")
    with pytest.raises(ValueError, match=rf"the server at {root} answered GET /models with HTTP 404: Not Found: "
                                         r"base_url must be the API root \(http://HOST:8000/v1\)"):  # fmt: skip
        make_agent(backend="vllm-server", backend_config={"base_url": root})


def test_an_unreachable_server_names_the_fix():
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(ServerUnreachable, match=rf"cannot reach the vLLM server at {url} \(.*\): start it with "
                                                r"`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve"):  # fmt: skip
        make_agent(backend="vllm-server", backend_config=VLLMServerConfig(base_url=url))


def test_a_server_without_runtime_lora_updating_names_the_fix():
    with ChatServer(lambda body: Reply(), model="tiny") as chat:  # answers /v1/models, has no LoRA routes
        agent = make_agent(backend="vllm-server", backend_config={"base_url": chat.base_url})
        with pytest.raises(RuntimeError, match=r"has no /v1/load_lora_adapter route: start it with runtime LoRA "
                                               r"updating on \(`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):  # fmt: skip
            agent.get_action(_prompts())


def test_a_lora_config_vllm_cannot_serve_is_refused_before_any_request(server):
    from peft import LoraConfig

    dora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"cannot serve this LoraConfig: use_dora=True \(vLLM does not support DoRA\)"):
        _agent(server, lora_config=dora)
    assert server.loaded == [] and server.completions == 0


def test_an_adapter_rank_above_the_servers_max_is_refused_with_the_servers_reason():
    with LoRAServer(make_model(), name="tiny", max_lora_rank=2) as small:
        agent = make_agent(backend="vllm-server", backend_config={"base_url": small.base_url})
        with pytest.raises(RuntimeError, match=r"refused the adapter saved in .* \(LoRA rank 4 is greater than "
                                               r"max_lora_rank 2\.\)"):  # fmt: skip
            agent.get_action(_prompts())


# --------------------------------------------------------------------------------- a whole run
def length_reward(completion, answer, question):
    """Longer completions (up to 12 characters) score more: rewards vary within groups and between agents."""
    return min(len(completion), 12) / 12


def test_a_population_trains_through_the_server_across_a_restart(tmp_path, monkeypatch, caplog):
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from llm_gym.algorithms import (
        HyperparameterConfig,
        Mutations,
        RLParameter,
        TournamentSelection,
        create_population,
        finetune_llm_reasoning,
    )
    from llm_gym.reasoning_gym import ReasoningGym
    from llm_gym.tiny import tiny_model_path

    monkeypatch.chdir(tmp_path)
    model_path = str(tiny_model_path("tiny"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    env = ReasoningGym.from_task("llm_gym/Countdown-v0", tokenizer, train_size=64, test_size=4,
                                 data_batch_size_per_gpu=2, seed=0, reward_fn=length_reward)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    tournament = TournamentSelection(tournament_size=2, elitism=True, population_size=2, rand_seed=0)
    mutation = Mutations(no_mutation=0.0, rl_hp=1.0, mutation_sd=0.5, rand_seed=0,
                         hp_config=HyperparameterConfig(lr=RLParameter(1e-4, 1e-1, log_scale=True)))  # fmt: skip
    caplog.set_level(logging.WARNING)
    with LoRAServer(model_path, name="tiny") as server:
        # Requests (concurrency=1: one at a time, in agent order): the population samples in one
        # generate_batches call per step (agent0, agent1; steps 1, 2), then scores 2 batches of test problems,
        # both agents per batch: a restart after agent0's first batch (request 5) leaves agent1's to a server
        # that is down for 0.5 s, then back without either adapter, neither changed since (nothing to sync
        # before asking): agent1's request and then agent0's second one are refused once each (404) and resent.
        server.restart_after(5, down_for=0.5)
        pop = create_population(2, model_name=model_path, pad_token_id=tokenizer.pad_token_id, device="cpu", seed=0,
                                group_size=2, max_output_tokens=6, lr=1e-2, lora_config=lora, backend="vllm-server",
                                backend_config={"base_url": server.base_url, "concurrency": 1})  # fmt: skip
        model, prefix = pop[0].model, pop[0].backend.prefix
        base0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        lora0 = {n.replace(".agent0.", "."): p.detach().clone() for n, p in model.named_parameters() if ".agent0." in n}
        pop = finetune_llm_reasoning(pop, env, evo_steps=2, tournament=tournament, mutation=mutation, max_steps=4,
                                     evaluation_interval=2, eval_problems=4, log_dir="run", verbose=False,
                                     close_backends=False)  # the test closes the backend itself  # fmt: skip
        served_now = {c["id"] for c in server.models()["data"]} - {"tiny"}
        backend = pop[0].backend
        last_names = set(backend.served_names.values())
        backend.close()
        served_after_close = {c["id"] for c in server.models()["data"]} - {"tiny"}

    assert server.restarts == 1 and any("does not answer" in r.message for r in caplog.records)
    assert any("(restarted?): loading" in r.message for r in caplog.records)
    # every rollout and evaluation went through the server, each with a served adapter, never the base
    # 2 agents x 4 steps of sampling, 2 agents x 2 evaluations x 2 batches, and the 2 refused after the restart
    assert server.completions == 2 * 4 + 2 * 2 * 2 + 2 and all(b["model"].startswith(prefix) for b in server.bodies)
    assert all(torch.equal(base0[n], p) for n, p in model.named_parameters() if "lora_" not in n)  # base untouched
    for agent in pop:
        assert agent.steps == 4
        marker = f".{agent.adapter_name}."
        moved = [n for n, p in model.named_parameters() if marker in n
                 and not torch.equal(p, lora0[n.replace(marker, ".")])]  # fmt: skip
        assert moved, f"{agent.adapter_name}: no LoRA parameter changed"
    # the server held one adapter per member that generated last, under the name it was last synced as;
    # close() unloads them
    assert len(served_now) == 2 and served_now == last_names and served_after_close == set()


def test_token_ids_are_read_from_token_id_log_prob_tokens_when_the_server_has_no_return_token_ids():
    from llm_gym.algorithms.rollout.vllm_server import _read_choices

    old_server = {"choices": [  # out of order on purpose: choices are put back by index
        {"index": 1, "logprobs": {"tokens": ["token_id:9"], "token_logprobs": [-0.5]}},
        {"index": 0, "logprobs": {"tokens": ["token_id:4", "token_id:0"], "token_logprobs": [-1.0, -2.0]}}]}
    assert _read_choices(old_server, 2, "URL") == ([[4, 0], [9]], [[-1.0, -2.0], [-0.5]])
    text_only = {"choices": [{"index": 0, "text": "hi", "logprobs": {"tokens": ["hi"], "token_logprobs": [-1.0]}}]}
    with pytest.raises(RuntimeError, match="the vLLM server at URL returned completions without token ids"):
        _read_choices(text_only, 1, "URL")
    with pytest.raises(RuntimeError, match="the vLLM server at URL returned 1 completions, expected 4"):
        _read_choices(text_only, 4, "URL")
