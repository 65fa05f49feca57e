"""``llm-gym eval --model <elite folder>``: a saved LoRA adapter is evaluated on its base model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llm_gym.algorithms.rollout.policies import ModelPolicy, adapter_base
from llm_gym.cli import main
from llm_gym.tiny import tiny_model_path


def _rows(out):
    return {line.split("|")[3].strip(): line.split("|")[4].strip() for line in out.splitlines()[2:] if "|" in line}


@pytest.fixture
def elite(tmp_path):
    """``runs/t1/sft_model`` (the tiny model) and ``runs/t1/elites/elite-x``: a LoRA adapter whose base path is relative."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tmp_path / "runs" / "t1" / "sft_model"
    shutil.copytree(tiny_model_path("tiny"), base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    folder = tmp_path / "runs" / "t1" / "elites" / "elite-x"
    model.save_pretrained(folder)  # lora_B starts at zero: the adapted model answers as the base does
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "runs/t1/sft_model"  # as a run writes it: relative to its working folder
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return base, folder


def test_an_elite_is_loaded_on_its_base_and_scores_like_it_when_its_adapter_is_zero(elite, tmp_path, capsys,
                                                                                   monkeypatch):  # fmt: skip
    base, folder = elite
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # "runs/t1/sft_model" does not exist from here: found beside the elite's run
    assert adapter_base(str(folder)) == str(base.resolve())
    policy, _ = ModelPolicy.from_pretrained(str(folder), 4)
    from peft import PeftModel

    assert isinstance(policy.model, PeftModel)
    lora_b = [p for n, p in policy.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    common = ["eval", "--task", "llm_gym/Subtraction-v0", "-n", "3", "--max-new-tokens", "5"]
    assert main([*common, "--model", str(folder), "--save-dataset", "elite"]) == 0
    from_elite = _rows(capsys.readouterr().out)
    assert main([*common, "--model", str(base), "--save-dataset", "base"]) == 0
    assert _rows(capsys.readouterr().out) == from_elite
    from llm_gym.rollout_dataset import load_rollouts

    assert load_rollouts("elite")["completion"] == load_rollouts("base")["completion"]
    assert adapter_base(str(base)) is None  # a plain model folder


def test_an_elite_whose_base_is_gone_names_the_fix(elite, tmp_path):
    base, folder = elite
    shutil.rmtree(base)
    with pytest.raises(ValueError, match="the base model 'runs/t1/sft_model' of adapter .* is not found"):
        adapter_base(str(folder))
