"""The stand-in vLLM server (llm_gym.lora_server) over real HTTP: vLLM's fields, answers and errors."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from llm_gym.lora_server import LoRAServer
from llm_gym.tiny import tiny_model_path


@pytest.fixture(scope="module")
def model_path():
    return str(tiny_model_path("tiny"))


@pytest.fixture
def server(model_path):
    with LoRAServer(model_path, name="tiny") as s:
        yield s


def _post(server, route, body):
    req = urllib.request.Request(server.base_url + route, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            text = resp.read().decode()
            return resp.status, (json.loads(text) if resp.headers["Content-Type"] == "application/json" else text)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode())


def _adapter(model_path, folder, r=4):
    """A PEFT adapter on the tiny model with non-zero B (so it changes the outputs), saved in ``folder``."""
    torch.manual_seed(0)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(folder))
    return model.eval()


def test_greedy_completions_with_token_ids_and_log_probs_equal_transformers(server, model_path, tmp_path):
    peft_model = _adapter(model_path, tmp_path / "a")
    assert _post(server, "/load_lora_adapter", {"lora_name": "a-1", "lora_path": str(tmp_path / "a")}) == (
        200, "Success: LoRA adapter 'a-1' added successfully.")  # fmt: skip
    prompts = [[5, 6, 7], [8, 9]]
    for model, expect in (("a-1", peft_model), ("tiny", None)):
        status, body = _post(server, "/completions", {
            "model": model, "prompt": prompts, "n": 2, "max_tokens": 5, "temperature": 0, "logprobs": 1,
            "return_tokens_as_token_ids": True, "return_token_ids": True, "ignore_eos": True})  # fmt: skip
        assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]  # prompt-major
        assert body["usage"]["prompt_tokens"] == 3 + 2 and body["usage"]["completion_tokens"] == 4 * 5
        for i, choice in enumerate(body["choices"]):
            prompt = prompts[i // 2]
            net = expect if expect is not None else peft_model.get_base_model()
            with torch.no_grad(), (peft_model.disable_adapter() if expect is None else torch.enable_grad()):
                ids = torch.tensor([prompt])
                out = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                   eos_token_id=None, top_k=None, top_p=None, temperature=None)[0, len(prompt):]  # fmt: skip
                logits = net(torch.tensor([prompt + out.tolist()])).logits[0, len(prompt) - 1 : -1]
            want = torch.log_softmax(logits, -1).gather(-1, out[:, None])[:, 0]
            assert choice["token_ids"] == out.tolist() and choice["prompt_token_ids"] == prompt
            assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in out.tolist()]
            assert torch.allclose(torch.tensor(choice["logprobs"]["token_logprobs"]), want, atol=1e-5)
            # greedy: the sampled token is the top-1 one, so each top_logprobs entry holds exactly it
            assert [list(d) for d in choice["logprobs"]["top_logprobs"]] == [[f"token_id:{t}"] for t in out.tolist()]
            assert choice["finish_reason"] == "length"
    with_adapter = _post(server, "/completions", {"model": "a-1", "prompt": [5, 6, 7], "max_tokens": 5,
                                                  "temperature": 0, "return_token_ids": True})[1]  # fmt: skip
    base = _post(server, "/completions", {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0,
                                          "return_token_ids": True})[1]  # fmt: skip
    assert with_adapter["choices"][0]["token_ids"] != base["choices"][0]["token_ids"]  # the adapter is applied


def test_stop_token_ids_end_a_completion_and_a_seed_repeats_a_sample(server):
    stops = list(range(0, 500, 5))  # a fifth of the tiny vocabulary ends a completion
    body = {"model": "tiny", "prompt": [[5, 6, 7]], "n": 4, "max_tokens": 12, "seed": 3, "return_token_ids": True,
            "stop_token_ids": stops, "ignore_eos": True}  # fmt: skip
    first, second = _post(server, "/completions", body)[1], _post(server, "/completions", body)[1]
    assert [c["token_ids"] for c in first["choices"]] == [c["token_ids"] for c in second["choices"]]
    for c in first["choices"]:
        ids = c["token_ids"]
        assert not set(ids[:-1]) & set(stops)  # no stop id before the last token
        assert (c["finish_reason"], c["stop_reason"]) == (("stop", ids[-1]) if ids[-1] in stops else ("length", None))
        assert len(ids) == 12 or ids[-1] in stops
    assert {c["finish_reason"] for c in first["choices"]} == {"stop", "length"}  # this seed gives both


def test_adapter_routes_answer_like_vllm(server, model_path, tmp_path):
    _adapter(model_path, tmp_path / "a")
    _adapter(model_path, tmp_path / "big", r=8)
    load = {"lora_name": "a-1", "lora_path": str(tmp_path / "a")}
    assert _post(server, "/load_lora_adapter", load)[0] == 200
    assert _post(server, "/load_lora_adapter", load) == (400, {"error": {
        "message": "The lora adapter 'a-1' has already been loaded.", "type": "InvalidUserInput", "param": None,
        "code": 400}})  # fmt: skip
    status, body = _post(server, "/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "none")})
    assert status == 404 and body["error"]["message"] == f"Loading lora x failed: No adapter found for {tmp_path / 'none'}"
    small = LoRAServer(model_path, name="tiny", max_lora_rank=4).start()
    try:
        status, body = _post(small, "/load_lora_adapter", {"lora_name": "b", "lora_path": str(tmp_path / "big")})
        assert status == 400 and body["error"]["message"] == "LoRA rank 8 is greater than max_lora_rank 4."
    finally:
        small.close()
    assert [c["id"] for c in json.load(urllib.request.urlopen(server.base_url + "/models"))["data"]] == ["tiny", "a-1"]
    assert _post(server, "/unload_lora_adapter", {"lora_name": "a-1"}) == (
        200, "Success: LoRA adapter 'a-1' removed successfully.")  # fmt: skip
    assert _post(server, "/unload_lora_adapter", {"lora_name": "a-1"})[0] == 404
    status, body = _post(server, "/completions", {"model": "a-1", "prompt": [5]})
    assert (status, body["error"]["message"]) == (404, "The model `a-1` does not exist.")
    status, body = _post(server, "/completions", {"model": "tiny", "prompt": "text"})
    assert status == 400 and "takes prompts as token ids" in body["error"]["message"]
    assert _post(server, "/chat/completions", {})[0] == 404


def test_restart_forgets_adapters_and_keeps_the_port(server, model_path, tmp_path):
    _adapter(model_path, tmp_path / "a")
    url = server.base_url
    _post(server, "/load_lora_adapter", {"lora_name": "a-1", "lora_path": str(tmp_path / "a")})
    server.restart()
    assert server.base_url == url and server.restarts == 1
    assert _post(server, "/completions", {"model": "a-1", "prompt": [5]})[0] == 404
    assert _post(server, "/completions", {"model": "tiny", "prompt": [5], "max_tokens": 2})[0] == 200
