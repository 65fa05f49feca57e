"""The vLLM backend against a fake ``vllm`` module (vLLM needs CUDA; it cannot run here)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from grpo_tiny import make_agent, make_model, prompt, single_thread

from llm_gym.algorithms.rollout.backend import SamplingConfig
from llm_gym.algorithms.rollout.vllm import VLLMConfig, convert_outputs, sampling_params_kwargs

_one_thread = pytest.fixture(autouse=True)(single_thread)


class _FakeLLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.events = []
        self.removed = []
        self.llm_engine = types.SimpleNamespace(remove_lora=self.removed.append)

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        self.events.append(("generate", prompts, params, lora_request))
        assert Path(lora_request.lora_path, "adapter_model.safetensors").is_file()
        assert Path(lora_request.lora_path, "adapter_config.json").is_file()
        outputs = []
        for i, _ in enumerate(prompts):
            # completion j of prompt i: j + 1 tokens of id 20 + i, the last one replaced by EOS (0)
            rows = [[20 + i] * j + [0] for j in range(params.kwargs["n"])]
            outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=r) for r in rows]))
        return outputs

    def sleep(self, level=1):
        self.events.append(("sleep", level))

    def wake_up(self):
        self.events.append(("wake_up",))


class _FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _FakeLoRARequest:
    def __init__(self, lora_name, lora_int_id, lora_path):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = _FakeLLM, _FakeSamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = _FakeLoRARequest
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    return vllm


def test_sampling_params_mapping():
    sampled = sampling_params_kwargs(SamplingConfig(group_size=8, max_new_tokens=32, temperature=0.7, top_p=0.9), [0, 5])
    assert sampled == {"n": 8, "max_tokens": 32, "stop_token_ids": [0, 5], "temperature": 0.7, "top_p": 0.9,
                       "top_k": -1}  # fmt: skip
    greedy = sampling_params_kwargs(SamplingConfig(group_size=1, max_new_tokens=4, greedy=True, top_k=5), [0])
    assert greedy == {"n": 1, "max_tokens": 4, "stop_token_ids": [0], "temperature": 0.0, "top_p": 1.0, "top_k": -1}


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
