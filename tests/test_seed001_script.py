"""Seed 001 (the AgileRL GRPO Countdown tutorial) runs end to end against llm-gym with only its imports changed.

The tutorial's code is kept below verbatim, indentation restored (the stored seed text lost it; a test
checks line by line that the two agree when the seed file is available). The test applies ONLY:

* the four import substitutions (``agilerl.*`` -> ``llm_gym.algorithms`` / ``llm_gym``), on the text;
* the three constants ``MODEL_PATH`` (the tiny local model), ``DATASET`` and ``USE_VLLM=False``, and the
  script's ``load_dataset``, replaced in the script's namespace after it is executed: this machine has no
  network, so ``load_dataset`` returns a local 50,000-row dataset of the hub dataset's schema.

Budget, honestly bounded: the script asks for one epoch of 40,000 problems (4,000 steps of 10 prompts x 8
completions, up to 1024 tokens each). The documented smoke caps of ``finetune_llm_reasoning``
(``LLM_GYM_MAX_STEPS``, ``LLM_GYM_MAX_OUTPUT_TOKENS``, ``LLM_GYM_EVAL_PROBLEMS``) bound it to 2 steps
of 16-token completions and a 10-problem evaluation, without touching the script. The data stays the
size the script selects (``.select(range(50000))`` must see 50,000 rows): preparing 50,000 prompts
in ``ReasoningGym`` is most of this test's ~30 s.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np
import pytest

from llm_gym.tiny import tiny_model_path
from tests.seed001 import SEED_GLOB, SEED_SCRIPT, ported_script


def fake_load_dataset(name, split="train"):
    """A local stand-in for ``Jiayi-Pan/Countdown-Tasks-3to4``: 50,000 rows of ``nums`` (3 or 4 ints in
    1..99) and a reachable ``target`` (their sum), built in well under a second."""
    import datasets

    assert (name, split) == ("local/countdown-3to4", "train")
    rng = np.random.default_rng(0)
    n = 50_000
    nums = rng.integers(1, 100, size=(n, 4))
    sizes = rng.integers(3, 5, size=n)
    rows = [nums[i, : sizes[i]].tolist() for i in range(n)]
    return datasets.Dataset.from_dict({"nums": rows, "target": [int(sum(r)) for r in rows]})


def test_embedded_script_is_the_seed_code():
    paths = glob.glob(SEED_GLOB)
    if not paths:
        pytest.skip("the seed file is not available on this machine")
    text = open(paths[0], encoding="utf-8").read()
    seed = text[text.index("Example\nimport re") + len("Example\n") :]
    strip = lambda code: [line.strip() for line in code.splitlines() if line.strip()]  # noqa: E731
    assert strip(SEED_SCRIPT) == strip(seed)


@pytest.fixture
def one_thread():
    """Tiny matmuls are fastest on one thread (torch's pool costs more than it saves on 2 cores)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_seed_001_script_runs_end_to_end(tmp_path, monkeypatch, caplog, one_thread):
    monkeypatch.chdir(tmp_path)  # the script writes checkpoints/, runs/ and countdown_completions.txt here
    monkeypatch.setenv("LLM_GYM_MAX_STEPS", "2")
    monkeypatch.setenv("LLM_GYM_MAX_OUTPUT_TOKENS", "16")
    monkeypatch.setenv("LLM_GYM_EVAL_PROBLEMS", "10")
    namespace = {"__name__": "seed001"}
    exec(compile(ported_script(), "seed001.py", "exec"), namespace)  # runs the imports and definitions only
    namespace.update(MODEL_PATH=str(tiny_model_path("tiny")), DATASET="local/countdown-3to4", USE_VLLM=False,
                     load_dataset=fake_load_dataset)  # fmt: skip
    caplog.set_level(logging.WARNING)
    namespace["main"]()

    assert any("wandb" in r.message for r in caplog.records)  # wb=True without wandb: warned, went on
    assert any("LLM_GYM_MAX_STEPS=2" in r.message for r in caplog.records)
    (run,) = (tmp_path / "runs").iterdir()
    metrics = (run / "metrics.csv").read_text()
    assert "agent0/loss" in metrics and "evo/fitness_max" in metrics
    assert (run / "learning_curve.png").is_file() and (run / "completions.jsonl").is_file()
    index = json.loads((tmp_path / "checkpoints" / "index.json").read_text())
    assert len(index) == 1 and index[0]["step"] == 2  # the final evaluation saved the elite
    elite = tmp_path / "checkpoints" / index[0]["path"]
    assert {"adapter_config.json", "adapter_model.safetensors", "elite.json"} <= set(os.listdir(elite))
    meta = json.loads((elite / "elite.json").read_text())
    assert meta["metadata"]["hyperparameters"]["group_size"] == 8
    assert meta["metadata"]["hyperparameters"]["max_output_tokens"] == 16
