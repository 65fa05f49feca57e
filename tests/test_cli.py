"""The ``llm-gym`` command line: list, eval (oracle), train with a YAML config, resume, and bad input."""

from __future__ import annotations

import json

import pytest

from llm_gym.cli import main

TINY_RUN = """\
task: llm_gym/Countdown-v0
task_kwargs: {min_numbers: 3, max_numbers: 3, max_number: 9, max_target: 30}
sft_steps: 5
sft_examples: 32
sft_batch_size: 8
population: 2
train_size: 16
test_size: 4
prompts_per_step: 2
group_size: 2
max_output_tokens: 12
max_steps: 2
evo_steps: 1
evaluation_interval: 1
"""


def test_list_prints_every_registered_id(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "llm_gym/Countdown-v0" in out and "llm_gym/Subtraction-v0" in out


def test_eval_of_the_oracle_scores_full_marks(capsys):
    assert main(["eval", "--task", "llm_gym/Countdown-v0", "-n", "5"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[3].strip(): float(line.split("|")[4]) for line in out.splitlines()[2:]}
    assert rows == {"format": 1.0, "equation": 1.0, "total": 2.0, "exact accuracy": 1.0}


def test_train_runs_the_pipeline_then_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "Held-out results on 4 llm_gym/Countdown-v0 problems (greedy):" in out
    assert "SFT start" in out and "elite (GRPO)" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sft"]["problems"] == 4 and set(summary["elite"]) >= {"reward/total", "accuracy"}
    assert (run / "metrics.csv").is_file() and (run / "learning_curve.png").is_file()
    assert any((run / "elites").glob("elite-step*"))
    state = json.loads((run / "checkpoints" / "latest" / "state.json").read_text())
    assert state["step"] == 2

    # Resume to step 3: the run folder is found from the checkpoint, the SFT model from the cache.
    assert main(["train", "--config", str(config), "--max-steps", "3", "--resume", str(run / "checkpoints")]) == 0
    assert json.loads((run / "checkpoints" / "latest" / "state.json").read_text())["step"] == 3


def test_train_rejects_an_unknown_config_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("populaton: 4\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown train config key 'populaton'; valid keys:" in capsys.readouterr().err


def test_eval_of_a_model_uses_the_fitness_evaluation(capsys):
    """``--model`` goes through the same rollout and evaluation as an agent's fitness: same numbers."""
    from llm_gym.algorithms.rollout.policies import ModelPolicy
    from llm_gym.algorithms.rollout.rollout import evaluate
    from llm_gym.reasoning_gym import ReasoningGym
    from llm_gym.tiny import tiny_model_path

    model = str(tiny_model_path("tiny"))
    assert main(["eval", "--task", "llm_gym/Subtraction-v0", "--model", model, "-n", "3", "--max-new-tokens", "6"]) == 0
    rows = {line.split("|")[3].strip(): float(line.split("|")[4]) for line in capsys.readouterr().out.splitlines()[2:]}
    policy, tokenizer = ModelPolicy.from_pretrained(model, 6)
    env = ReasoningGym.from_task("llm_gym/Subtraction-v0", tokenizer, train_size=3, test_size=3, seed=0)
    metrics = evaluate(policy, env)
    assert metrics["problems"] == 3.0
    assert rows["total"] == pytest.approx(round(metrics["reward/total"], 3), abs=1e-3)
    assert rows["exact accuracy"] == pytest.approx(round(metrics["accuracy"], 3), abs=1e-3)
