"""The vLLM backend against a stand-in ``vllm`` module (vLLM needs CUDA; it cannot run here).

The stand-in keeps to vLLM's API for the calls the backend makes (checked against vLLM's source,
0.10-0.2x): ``LLM(model, **engine_args)`` rejects unknown engine arguments and ranks outside
``MaxLoRARanks``; ``generate(prompts, sampling_params, *, use_tqdm, lora_request)`` takes one or a
per-prompt list of params and LoRA requests; ``llm_engine.add_lora/remove_lora/list_loras``;
``sleep(level)``/``wake_up(tags)``; ``SamplingParams`` rejects unknown fields and greedy ``n > 1``;
stopping follows ``ignore_eos``/``stop_token_ids`` (the generation config's EOS id counts only
without ``ignore_eos``). It is stricter than vLLM where a real run would silently go wrong:
generating, loading or removing an adapter while asleep raises.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import multiprocessing
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from grpo_tiny import lora_config, make_agent, make_model, prompt, single_thread
from peft import LoraConfig

from llm_gym.algorithms.rollout import vllm as vllm_backend
from llm_gym.algorithms.rollout.backend import SamplingConfig
from llm_gym.algorithms.rollout.vllm import (
    AdapterBatch,
    VLLMConfig,
    check_lora_config,
    convert_outputs,
    logprob_drift,
    lora_rank_for,
    sampling_params_kwargs,
    truncated_importance_weights,
)

_one_thread = pytest.fixture(autouse=True)(single_thread)

ROOT = Path(__file__).resolve().parents[2]
ENGINE_ARGS = {"enable_lora", "max_lora_rank", "max_loras", "max_cpu_loras", "gpu_memory_utilization",
               "tensor_parallel_size", "max_num_seqs", "max_model_len", "max_num_batched_tokens", "enable_sleep_mode",
               "enforce_eager", "dtype", "seed", "distributed_executor_backend", "logprobs_mode"}  # fmt: skip
SAMPLING_FIELDS = {"n", "max_tokens", "stop_token_ids", "ignore_eos", "detokenize", "temperature", "top_p", "top_k",
                   "logprobs", "seed"}  # fmt: skip
GENERATION_CONFIG_EOS = 3  # an EOS id of the model's generation config, which vLLM stops on unless ignore_eos
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING")


def _check_adapter(request, max_rank):
    """What vLLM's PEFTHelper checks when it reads an adapter folder."""
    folder = Path(request.lora_path)
    assert (folder / "adapter_model.safetensors").is_file()
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("modules_to_save") or config.get("use_dora") or config.get("bias", "none") != "none":
        raise ValueError("vLLM only supports modules_to_save being None / does not support DoRA / bias")
    if config["r"] > max_rank:
        raise ValueError(f"LoRA rank {config['r']} is greater than max_lora_rank {max_rank}")


class _FakeEngine:
    def __init__(self, llm):
        self.llm, self.loras, self.loaded, self.shutdowns = llm, {}, [], []
        self.engine_core = types.SimpleNamespace(shutdown=lambda: self.shutdowns.append(1))

    def add_lora(self, lora_request):
        if self.llm.sleeping:
            raise RuntimeError("add_lora while asleep writes unmapped GPU memory")
        _check_adapter(lora_request, self.llm.kwargs["max_lora_rank"])
        self.loras[lora_request.lora_int_id] = lora_request
        self.loaded.append(lora_request.lora_int_id)
        return True

    def remove_lora(self, lora_id):
        if self.llm.sleeping:
            raise RuntimeError("remove_lora while asleep resets an unmapped GPU slot")
        self.llm.removed.append(lora_id)
        return self.loras.pop(lora_id, None) is not None

    def list_loras(self):
        return set(self.loras)


class _FakeLLM:
    instances: list[_FakeLLM] = []
    rows = None  # a test may set a function (prompt index, n) -> token rows

    def __init__(self, model, **kwargs):
        unknown = set(kwargs) - ENGINE_ARGS
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        if kwargs.get("max_lora_rank", 16) not in (1, 8, 16, 32, 64, 128, 256, 320, 512):
            raise ValueError("max_lora_rank: Input should be 1, 8, 16, 32, 64, 128, 256, 320 or 512")
        if kwargs.get("max_cpu_loras", 1) < kwargs.get("max_loras", 1):
            raise ValueError("max_cpu_loras must be >= max_loras")
        self.kwargs = {"model": model, **kwargs}
        self.events, self.removed, self.sleeping = [], [], False
        self.llm_engine = _FakeEngine(self)
        _FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None):
        if self.sleeping:
            raise RuntimeError("generate while asleep")
        for name, arg in (("params", sampling_params), ("lora_request", lora_request)):
            if isinstance(arg, list) and len(arg) != len(prompts):
                raise ValueError(f"The lengths of prompts and {name} must be the same.")
        self.events.append(("generate", prompts, sampling_params, lora_request))
        outputs = []
        for i, _ in enumerate(prompts):
            params = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
            lora = lora_request[i] if isinstance(lora_request, list) else lora_request
            if lora.lora_int_id not in self.llm_engine.loras:  # vLLM loads an unknown id lazily from its path
                _check_adapter(lora, self.kwargs["max_lora_rank"])
            kw = params.kwargs
            offset = 10 * ((lora.lora_int_id - 1) % 5)  # completions depend on which adapter served them
            # completion j of prompt i: j tokens of id 20 + i + offset, then EOS (the first stop id)
            rows = _FakeLLM.rows(i, kw["n"]) if _FakeLLM.rows else [
                [20 + i + offset] * j + [kw["stop_token_ids"][0]] for j in range(kw["n"])]  # fmt: skip
            stops = set(kw["stop_token_ids"]) | (set() if kw.get("ignore_eos") else {GENERATION_CONFIG_EOS})
            done = []
            for row in rows:
                row = row[: kw["max_tokens"]]
                cut = next((t + 1 for t, tok in enumerate(row) if tok in stops), len(row))
                done.append(types.SimpleNamespace(token_ids=row[:cut]))
            if kw.get("logprobs") == 0:
                for c in done:
                    c.logprobs = [{tok: types.SimpleNamespace(logprob=-0.5 - 0.01 * t, rank=1)}
                                  for t, tok in enumerate(c.token_ids)]  # fmt: skip
            outputs.append(types.SimpleNamespace(outputs=done))
        return outputs

    def sleep(self, level=1):
        if not self.kwargs["enable_sleep_mode"] or self.sleeping:
            raise RuntimeError("sleep without enable_sleep_mode, or twice")
        self.sleeping = True
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        if not self.sleeping:
            raise RuntimeError("wake_up while awake")
        self.sleeping = False
        self.events.append(("wake_up",) if tags is None else ("wake_up", tuple(tags)))


class _FakeSamplingParams:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"Unexpected keyword argument {sorted(unknown)[0]!r}")
        if kwargs.get("temperature", 1.0) == 0 and kwargs.get("n", 1) > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {kwargs['n']}.")
        self.kwargs = kwargs


class _FakeLoRARequest:
    def __init__(self, lora_name, lora_int_id, lora_path=""):
        if lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {lora_int_id}")
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = _FakeLLM, _FakeSamplingParams
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = _FakeLoRARequest
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    for name in LAUNCH_ENV:  # the in-process mode writes these; restored after the test
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_FakeLLM, "instances", [])
    monkeypatch.setattr(_FakeLLM, "rows", None)
    yield vllm
    for backend in list(vllm_backend._LIVE):
        backend.close()


def _named_model():
    model = make_model()
    model.config._name_or_path = "tiny/qwen2"
    return model


def _vllm_agent(config=None, **kwargs):
    options = {"max_model_len": 64, "group_size": 3, "max_output_tokens": 6, **kwargs}
    return make_agent(_named_model(), use_vllm=True, vllm_config=config or VLLMConfig(), **options)


# ----------------------------------------------------------------------------- pure functions
def test_sampling_params_mapping():
    sampled = sampling_params_kwargs(SamplingConfig(group_size=8, max_new_tokens=32, temperature=0.7, top_p=0.9), [0, 5])
    assert sampled == {"n": 8, "max_tokens": 32, "stop_token_ids": [0, 5], "temperature": 0.7, "top_p": 0.9,
                       "top_k": -1, "ignore_eos": True, "detokenize": False}  # fmt: skip
    greedy = sampling_params_kwargs(SamplingConfig(group_size=1, max_new_tokens=4, greedy=True, top_k=5), [0])
    assert greedy == {"n": 1, "max_tokens": 4, "stop_token_ids": [0], "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                      "ignore_eos": True, "detokenize": False}  # fmt: skip
    assert sampling_params_kwargs(SamplingConfig(group_size=1, max_new_tokens=4), [0], logprobs=True)["logprobs"] == 0


def test_convert_outputs_matches_the_hf_format():
    outputs = [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[4, 0]),
                                              types.SimpleNamespace(token_ids=[5, 6, 7])])]  # fmt: skip
    out = convert_outputs(outputs, [torch.tensor([1, 2])], 2, [0], 0)
    assert out.completion_ids[0].tolist() == [[1, 2, 4, 0, 0], [1, 2, 5, 6, 7]]
    assert out.action_masks[0].tolist() == [[False, True, True, False], [False, True, True, True]]
    with pytest.raises(ValueError, match="vLLM returned 2 completions for prompt 0, expected 3"):
        convert_outputs(outputs, [torch.tensor([1, 2])], 3, [0], 0)


def test_vllm_config_validation():
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=1.5 must be in \(0, 1\]"):
        VLLMConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="sleep_level=2 is not supported: LoRA-only sync needs level 1"):
        VLLMConfig(sleep_mode=True, sleep_level=2)
    with pytest.raises(ValueError, match=r"max_lora_rank=24 must be one of vLLM's \(1, 8, 16"):
        VLLMConfig(max_lora_rank=24)
    with pytest.raises(ValueError, match="max_cpu_loras=2 must be >= max_loras=4"):
        VLLMConfig(max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValueError, match="distributed_executor_backend='torchrun' must be one of"):
        VLLMConfig(distributed_executor_backend="torchrun")
    with pytest.raises(ValueError, match="use tensor_parallel_size=1"):
        VLLMConfig(distributed_executor_backend="external_launcher", tensor_parallel_size=2)


def test_lora_rank_is_the_smallest_vllm_accepts():
    assert [lora_rank_for(r) for r in (1, 2, 8, 9, 16, 17, 64, 300, 321, 512)] == [1, 8, 8, 16, 16, 32, 64, 320,
                                                                                   512, 512]  # fmt: skip
    with pytest.raises(ValueError, match="r=513 exceeds vLLM's largest max_lora_rank 512"):
        lora_rank_for(513)


def test_lora_configs_vllm_cannot_serve_are_refused():
    check_lora_config(lora_config(r=16), 16)  # plain LoRA on the linear layers passes
    for bad, message in [
        (LoraConfig(r=4, modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\]"),
        (LoraConfig(r=4, use_dora=True), "use_dora=True"),
        (LoraConfig(r=4, bias="all"), "bias='all'"),
        (LoraConfig(r=4, rank_pattern={"q_proj": 8}), "rank_pattern"),
        (LoraConfig(r=32), "r=32 > VLLMConfig.max_lora_rank=16"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_lora_config(bad, 16)


def test_importance_weights_and_drift_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -3.0]])
    rollout = torch.tensor([[-1.5, -1.0, -3.0]])
    mask = torch.tensor([[True, True, False]])
    # exp(0.5) = 1.6487 capped at 1.5; exp(-1) = 0.3679; the masked-out token weighs 0
    weights = truncated_importance_weights(trainer, rollout, mask, cap=1.5)
    assert weights[0].tolist() == pytest.approx([1.5, math.exp(-1.0), 0.0])
    assert logprob_drift(trainer, rollout, mask) == {"mean_abs": 0.75, "max_abs": 1.0, "tokens": 2.0}


# -------------------------------------------------------------------------------- the engine
def test_vllm_backend_needs_a_model_name(fake_vllm):
    with pytest.raises(ValueError, match="loads the base model by name"):
        make_agent(use_vllm=True)


def test_agent_generates_through_vllm_with_fresh_lora_after_each_update(fake_vllm):
    model = make_model()
    model.config._name_or_path = "tiny/qwen2"
    agent = make_agent(model, use_vllm=True, vllm_config=VLLMConfig(sleep_mode=True, max_num_seqs=4),
                       max_model_len=64, group_size=3, max_output_tokens=6)  # fmt: skip
    llm = agent.backend.llm
    assert llm.kwargs["model"] == "tiny/qwen2" and llm.kwargs["enable_lora"] is True
    assert llm.kwargs["enable_sleep_mode"] is True and llm.kwargs["max_num_seqs"] == 4
    assert llm.kwargs["max_model_len"] == 64 and llm.kwargs["dtype"] == "float32"

    prompts = [prompt([5, 6, 7]), prompt([8])]
    ids, masks = agent.get_action(prompts)
    (kind, sent, params, lora), sleep = llm.events
    assert kind == "generate" and sent == [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8]}]
    assert params.kwargs["n"] == 3 and params.kwargs["max_tokens"] == 6 and params.kwargs["temperature"] == 1.0
    assert lora.lora_int_id == 1 and sleep == ("sleep", 1)  # the engine sleeps while the trainer runs
    assert ids[0].tolist() == [[5, 6, 7, 0, 0, 0], [5, 6, 7, 20, 0, 0], [5, 6, 7, 20, 20, 0]]
    assert masks[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]

    agent.learn((ids, masks, torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])))
    llm.events.clear()
    agent.get_action(prompts, training=False)
    assert llm.events[0] == ("wake_up",)
    _, _, params, lora = llm.events[1]
    assert params.kwargs["n"] == 1 and params.kwargs["temperature"] == 0.0
    assert lora.lora_int_id == 2 and llm.removed == [1]  # the updated adapter is served under a new id


def test_engine_defaults_resolved_at_construction(fake_vllm):
    agent = _vllm_agent(VLLMConfig(max_prompt_len=100), max_model_len=None)  # r=4, max_output_tokens=6
    kw = agent.backend.llm.kwargs
    assert kw["max_lora_rank"] == 8  # the smallest rank vLLM accepts >= r=4 (was 64: 8x the LoRA memory)
    assert kw["max_model_len"] == 106  # max_prompt_len 100 + max_output_tokens 6
    assert kw["max_num_batched_tokens"] == 4096 and kw["max_cpu_loras"] == 8 and kw["enforce_eager"] is True
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["seed"] == 0
    assert "logprobs_mode" not in kw
    env = os.environ
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "0", "1", "127.0.0.1")
    assert int(env["MASTER_PORT"]) > 0
    # without a prompt budget the default is capped by the model's context (max_position_embeddings=512)
    assert _vllm_agent(max_model_len=None).backend.llm.kwargs["max_model_len"] == 512


def test_bad_lora_config_fails_before_the_engine_is_built(fake_vllm):
    dora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="use_dora=True"):
        _vllm_agent(lora_config=dora)
    with pytest.raises(ValueError, match="r=4 > VLLMConfig.max_lora_rank=1"):
        _vllm_agent(VLLMConfig(max_lora_rank=1))
    assert _FakeLLM.instances == []


def test_in_process_engine_takes_each_ranks_gpu_under_accelerate(fake_vllm, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29511")  # a launcher's rendezvous is kept
    accelerator = types.SimpleNamespace(process_index=3, local_process_index=1, num_processes=4, device="cpu")
    agent = _vllm_agent(accelerator=accelerator, device="cpu", seed=None)
    env = os.environ
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("3", "1", "4", "29511")
    kw = agent.backend.llm.kwargs
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["seed"] == 3  # ranks sample apart


def test_engine_process_mode_names_an_unguarded_script(fake_vllm, monkeypatch, tmp_path, caplog):
    script = tmp_path / "train.py"
    main = types.ModuleType("__main__")
    main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", main)
    config = VLLMConfig(distributed_executor_backend=None)
    script.write_text("from llm_gym.algorithms import GRPO\nagent = GRPO('m', use_vllm=True)\n")
    with caplog.at_level(logging.WARNING, logger="llm_gym.algorithms.rollout.vllm_engine"):
        agent = _vllm_agent(config)
    assert "distributed_executor_backend" not in agent.backend.llm.kwargs  # vLLM's own engine process
    assert f"re-runs {script}; it has no `if __name__ == \"__main__\":` guard" in caplog.text
    caplog.clear()
    script.write_text("def main():\n    pass\n\n\nif __name__ == '__main__':\n    main()\n")
    with caplog.at_level(logging.WARNING, logger="llm_gym.algorithms.rollout.vllm_engine"):
        _vllm_agent(config)
    assert "guard" not in caplog.text
    inheriting = types.SimpleNamespace(_inheriting=True)  # the child re-running the script while it bootstraps
    monkeypatch.setattr(multiprocessing, "current_process", lambda: inheriting)
    with pytest.raises(RuntimeError, match="being re-run by the child process vLLM starts"):
        _vllm_agent(config)


# ---------------------------------------------------------------------------- phases, memory
def test_one_wake_per_phase_after_freeing_the_trainers_cache(fake_vllm, monkeypatch):
    agent = _vllm_agent(VLLMConfig(sleep_mode=True))
    llm, calls = agent.backend.llm, []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(vllm_backend.gc, "collect", lambda: calls.append("gc"))
    original_wake = llm.wake_up
    monkeypatch.setattr(llm, "wake_up", lambda tags=None: (calls.append("wake_up"), original_wake(tags)))
    prompts = [prompt([5, 6]), prompt([7])]

    agent.backend.sleep()  # the learn phase starts: the loop takes over the phases
    for _ in range(3):  # an evaluation phase of three batches
        agent.get_action(prompts, training=False)
    assert [e[0] for e in llm.events] == ["sleep", "wake_up", "generate", "generate", "generate"]
    assert calls == ["gc", "empty_cache", "wake_up"]  # the trainer's cached blocks go back before waking

    ids, masks = agent.get_action(prompts)  # a rollout in the same awake phase
    agent.backend.sleep()
    agent.backend.sleep()  # idempotent
    agent.learn((ids, masks, torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])))
    agent.get_action(prompts)  # the next rollout: one wake, then the sync of the new adapter, then generation
    assert [e[0] for e in llm.events[5:]] == ["generate", "sleep", "wake_up", "generate"]
    assert llm.llm_engine.loaded == [1, 2]  # loaded eagerly at each sync, while awake


def test_close_shuts_the_engine_down_and_frees_memory(fake_vllm, monkeypatch, caplog):
    agent = _vllm_agent(VLLMConfig(sleep_mode=True))
    with caplog.at_level(logging.WARNING, logger="llm_gym.algorithms.rollout.vllm"):
        other = _vllm_agent()
    assert "1 vLLM engine(s) built by other agents are still running" in caplog.text
    other.backend.close()
    backend, llm = agent.backend, agent.backend.llm
    agent.get_action([prompt([5])])
    llm.events.clear()
    folder, calls = backend._tmp, []
    monkeypatch.setattr(vllm_backend.gc, "collect", lambda: calls.append("gc"))
    backend.close()
    backend.close()  # idempotent
    assert llm.llm_engine.shutdowns == [1] and backend.llm is None and calls == ["gc"]
    assert llm.events == []  # it was asleep already (no second sleep before shutting down)
    assert not folder.exists() and len(vllm_backend._LIVE) == 0
    with pytest.raises(RuntimeError, match="this vLLM backend was closed"):
        agent.get_action([prompt([5])])


def test_close_drops_an_awake_engines_memory_before_shutdown(fake_vllm):
    agent = _vllm_agent(VLLMConfig(sleep_mode=True))
    llm = agent.backend.llm
    agent.backend.close()
    assert llm.events == [("sleep", 2)] and llm.llm_engine.shutdowns == [1]  # never woken again: level 2 is safe


def _phase_run(steps, **loop_kwargs):
    """A 2-agent population (one shared engine, sleep mode) trained ``steps`` steps by the loop; (pop, engine)."""
    from grpo_tiny import make_tokenizer

    from llm_gym.algorithms.run.loop import finetune_llm_reasoning
    from llm_gym.reasoning_gym import ReasoningGym

    env = ReasoningGym.from_task("llm_gym/Countdown-v0", make_tokenizer(), train_size=8, test_size=2,
                                 data_batch_size_per_gpu=2, seed=0)  # Countdown prompts: 529 characters here
    agent = _vllm_agent(VLLMConfig(sleep_mode=True), max_model_len=600, group_size=2)
    pop = [agent, agent.clone(index=1)]
    llm = agent.backend.llm
    options = {"max_steps": steps, "evaluation_interval": steps, "evo_steps": None, "eval_problems": 2,
               "verbose": False, "sample_interval": 0, "log_dir": "run", **loop_kwargs}  # fmt: skip
    return finetune_llm_reasoning(pop, env, **options), llm


def _phases(llm):
    """The engine's events with each run of generate calls written once: ``gen``."""
    kinds = []
    for event in llm.events:
        kind = "gen" if event[0] == "generate" else "sleep2" if event == ("sleep", 2) else event[0]
        if not (kind == "gen" and kinds[-1:] == ["gen"]):
            kinds.append(kind)
    return kinds


def test_training_loop_wakes_once_per_rollout_sleeps_once_per_learn_and_closes(fake_vllm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pop, llm = _phase_run(2)
    # step 1: both agents roll out in ONE generate call on the engine as built (awake), then learn (one sleep);
    # step 2: one wake, one call, learn; then one evaluation phase (both agents, one wake, one call) and close.
    assert _phases(llm) == ["gen", "sleep", "wake_up", "gen", "sleep", "wake_up", "gen", "sleep2"]
    assert [e[0] for e in llm.events].count("generate") == 3
    assert [e for e in llm.events if e[0] == "sleep"].count(("sleep", 1)) == 2  # the second learn finds it asleep
    assert llm.llm_engine.shutdowns == [1] and all(a.backend.llm is None for a in pop)
    assert len(vllm_backend._LIVE) == 0
    pop[0].close()
    pop[1].close()  # idempotent: the shared engine was shut down once
    assert llm.llm_engine.shutdowns == [1]
    with pytest.raises(RuntimeError, match="pass close_backends=False to keep generating"):
        pop[0].get_action([prompt([5])])


def test_training_loop_can_leave_the_engine_open_and_closes_it_on_an_error(fake_vllm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pop, llm = _phase_run(1, close_backends=False)
    assert llm.llm_engine.shutdowns == [] and pop[0].backend.llm is llm
    pop[0].get_action([prompt([5])], training=False)  # still serving, e.g. for a final evaluation
    pop[0].close()
    assert llm.llm_engine.shutdowns == [1]

    from llm_gym.algorithms.grpo.agent import GRPO

    def failing(self, experiences):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(GRPO, "learn", failing)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        _phase_run(1)
    assert _FakeLLM.instances[-1].llm_engine.shutdowns == [1] and len(vllm_backend._LIVE) == 0


# ------------------------------------------------------------------------------ adapters
def test_adapter_is_loaded_at_sync_and_a_bad_one_fails_there(fake_vllm, monkeypatch):
    agent = _vllm_agent(VLLMConfig(sleep_mode=True))
    engine = agent.backend.llm.llm_engine
    agent.backend.sync(agent)
    assert engine.list_loras() == {1}
    agent.backend.sleep()
    agent.backend.sync(agent)  # asleep: wakes first (the stand-in raises on add_lora while asleep)
    assert engine.list_loras() == {2} and agent.backend.llm.removed == [1]

    def reject(request):
        raise ValueError("LoRA rank 64 is greater than max_lora_rank 8")

    monkeypatch.setattr(engine, "add_lora", reject)
    with pytest.raises(RuntimeError, match=r"vLLM could not load the adapter 'default' saved in .*max_lora_rank 8"):
        agent.backend.sync(agent)


def test_adapter_edited_outside_learn_is_resynced(fake_vllm):
    agent = _vllm_agent()
    prompts = [prompt([5, 6])]
    agent.get_action(prompts)
    agent.get_action(prompts)
    assert agent.backend.llm.llm_engine.loaded == [1]  # unchanged adapter: served as it is
    lora_b = next(p for n, p in agent.model.named_parameters() if "lora_B.default" in n)
    with torch.no_grad():
        lora_b.add_(0.1)  # e.g. an SFT step on agent.model: the agent does not mark its weights dirty
    assert agent._weights_dirty is False
    agent.get_action(prompts)
    optimizer = torch.optim.SGD([lora_b], lr=0.1)
    lora_b.grad = torch.ones_like(lora_b)
    optimizer.step()
    agent.get_action(prompts)
    assert agent.backend.llm.llm_engine.loaded == [1, 2, 3] and agent.backend.llm.removed == [1, 2]


def test_one_call_serves_several_adapters(fake_vllm, caplog):
    agent = _vllm_agent()
    clone = agent.clone(index=1)  # shares the model and the engine
    assert clone.backend is agent.backend
    batches = [
        AdapterBatch(agent.adapter_name, [prompt([5, 6]), prompt([7])], SamplingConfig(group_size=2, max_new_tokens=4)),
        AdapterBatch(clone.adapter_name, [prompt([8])], SamplingConfig(group_size=3, max_new_tokens=4, temperature=0.7)),
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="llm_gym.algorithms.rollout.vllm"):
        first, second = agent.backend.generate_batches(batches)
    assert "one call serves 2 adapters but VLLMConfig.max_loras=1" in caplog.text
    _, sent, params, loras = agent.backend.llm.events[0]
    assert len(agent.backend.llm.events) == 1 and len(sent) == 3  # ONE generate call for both agents
    assert [r.lora_int_id for r in loras] == [1, 1, 2]  # each prompt carries its agent's adapter (both synced)
    assert [p.kwargs["n"] for p in params] == [2, 2, 3] and params[2].kwargs["temperature"] == 0.7
    # tokens 20 + prompt index + 10 * (lora id - 1): prompt 2 was served by the clone's adapter (id 2)
    assert first.completion_ids[1].tolist() == [[7, 0, 0], [7, 21, 0]]
    assert second.completion_ids[0].tolist() == [[8, 0, 0, 0], [8, 32, 0, 0], [8, 32, 32, 0]]
    with pytest.raises(KeyError, match=r"adapter 'ghost' is not in the model \(adapters: \['agent1', 'default'\]\)"):
        agent.backend.generate([prompt([5])], SamplingConfig(group_size=1, max_new_tokens=2), adapter_name="ghost")


def test_released_population_member_is_unloaded(fake_vllm):
    agent = _vllm_agent()
    clone = agent.clone(index=1)
    agent.backend.sync(agent)
    agent.backend.sync(clone)
    clone.release()
    agent.backend.sync(agent)
    assert agent.backend.llm.llm_engine.list_loras() == {3} and sorted(agent.backend.llm.removed) == [1, 2]


# ------------------------------------------------------------------------ outputs, budgets
def test_completions_stop_on_the_agents_eos_set_only(fake_vllm, monkeypatch):
    agent = _vllm_agent()
    monkeypatch.setattr(_FakeLLM, "rows", lambda i, n: [[5, GENERATION_CONFIG_EOS, 6, 0, 9]] * n)
    ids, masks = agent.get_action([prompt([4])], training=False)
    # vLLM alone would stop at the generation config's EOS 3; with ignore_eos only the agent's EOS 0 stops
    assert ids[0].tolist() == [[4, 5, 3, 6, 0]] and masks[0].tolist() == [[True, True, True, True]]


def test_engine_context_cuts_the_budget_or_refuses_the_prompt(fake_vllm, caplog):
    backend = _vllm_agent(max_model_len=8).backend
    with caplog.at_level(logging.WARNING, logger="llm_gym.algorithms.rollout.backend"):
        backend.generate([prompt([5, 6, 7, 8, 9])], SamplingConfig(group_size=1, max_new_tokens=6))
    assert backend.llm.events[-1][2].kwargs["max_tokens"] == 3  # 8 - 5 prompt tokens
    assert "exceeds max_model_len=8" in caplog.text
    with pytest.raises(ValueError, match="a prompt of 8 tokens leaves no room to generate within max_model_len=8"):
        backend.generate([prompt(list(range(10, 18)))], SamplingConfig(group_size=1, max_new_tokens=2))


def test_rollout_logprobs_align_with_the_action_masks(fake_vllm):
    agent = _vllm_agent(VLLMConfig(logprobs=True))
    assert agent.backend.llm.kwargs["logprobs_mode"] == "processed_logprobs"
    ids, masks = agent.get_action([prompt([5, 6, 7])])
    (logps,) = agent.backend.last_logprobs[0]
    assert logps.shape == masks[0].shape
    # completion j has j + 1 tokens with log-probs -0.5 - 0.01 t; they sit at mask positions 2 + t
    expected = [[0.0, 0.0] + [-0.5 - 0.01 * t if t <= j else 0.0 for t in range(3)] for j in range(3)]
    assert torch.allclose(logps, torch.tensor(expected))
    assert bool((logps[~masks[0]] == 0).all())


# --------------------------------------------------------------------------- smoke script
def test_gpu_smoke_script_compiles_and_imports_without_vllm():
    source = (ROOT / "benchmarks" / "vllm_smoke.py").read_text()
    tree = ast.parse(source)
    guards = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"]
    assert guards, "the smoke script must keep its __main__ guard (vLLM's engine process re-imports it)"
    from benchmarks import vllm_smoke

    assert callable(vllm_smoke.main) and callable(vllm_smoke.run_checks)


def test_engine_and_sampling_arguments_exist_in_the_installed_vllm():
    vllm = pytest.importorskip("vllm")  # only where vLLM is installed (a CUDA machine)
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    assert ENGINE_ARGS <= {f.name for f in dataclasses.fields(EngineArgs)}
    assert SAMPLING_FIELDS <= set(vllm.SamplingParams.__struct_fields__)
