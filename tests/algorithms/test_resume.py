"""Resuming the main job: the run's own settings, the same numbers after a kill, logs cut back, nothing written on refusal.

The tiny model scores 0 on every held-out problem after a few steps (and so never moves its adapter),
which would make "the resumed summary equals the original" true whatever the elite is. So evaluation
is replaced by a function of the agent: (its id + 1000 * its learning rate) / 100, below the
rubric's maximum 2 (which would stop the run). The SFT evaluation (agent 0, lr 1e-3) scores 0.01; evolution gives new ids and mutated rates, so a resume that reported the
wrong agent's numbers, or the SFT ones, shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llm_gym.algorithms.recipe import load_config, run_training
from llm_gym.algorithms.run.loggers import cut_logs, read_csv_metrics

REPO = Path(__file__).resolve().parents[2]

TINY_RUN = """\
sft_steps: 3
sft_examples: 16
sft_batch_size: 8
population: 2
train_size: 16
test_size: 4
prompts_per_step: 2
group_size: 2
max_output_tokens: 8
max_steps: 2
evo_steps: 1
evaluation_interval: 1
lr: 0.001
"""

FAKE_EVALUATE = textwrap.dedent('''
    import llm_gym.algorithms.grpo.agent as agent_module
    import llm_gym.algorithms.rollout.rollout as rollout_module
    import llm_gym.algorithms.grpo.population as population_module

    def adapter_evaluate(agent, env, max_problems=None, **kwargs):
        """Metrics that tell agents apart (see the module docstring)."""
        return {"reward/total": (agent.index + 1000 * agent.hps.lr) / 100, "accuracy": 0.0, "problems": 4.0}

    def population_evaluate(agents, env, max_problems=None, **kwargs):
        """The population's batched evaluation, by agent as above."""
        return [adapter_evaluate(agent, env) for agent in agents]

    agent_module.evaluate = rollout_module.evaluate = adapter_evaluate
    population_module.evaluate_population = population_evaluate
''')

KILL_AFTER_LAST_CHECKPOINT = FAKE_EVALUATE + textwrap.dedent('''
    import os, signal, sys
    import llm_gym.algorithms.run.loop as loop
    from llm_gym.algorithms.recipe import load_config, run_training

    save = loop.save_population

    def save_then_die(path, population, *, step, **kwargs):
        save(path, population, step=step, **kwargs)
        if step == 2:  # the run's last step: killed after its final checkpoint, before the summary
            os.kill(os.getpid(), signal.SIGKILL)

    loop.save_population = save_then_die
    run_training(load_config(sys.argv[1], output_dir=sys.argv[2]))
''')


@pytest.fixture
def adapter_evaluate(monkeypatch, tmp_path):
    """Evaluation by agent (see the module docstring), and a private SFT cache."""
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    namespace: dict = {}
    patches = ("agent_module.evaluate = rollout_module.evaluate = adapter_evaluate",
               "population_module.evaluate_population = population_evaluate")  # fmt: skip
    source = FAKE_EVALUATE
    for line in patches:
        source = source.replace(line, "")
    exec(source, namespace)  # noqa: S102
    import llm_gym.algorithms.grpo.agent as agent_module
    import llm_gym.algorithms.grpo.population as population_module
    import llm_gym.algorithms.rollout.rollout as rollout_module

    monkeypatch.setattr(agent_module, "evaluate", namespace["adapter_evaluate"])
    monkeypatch.setattr(rollout_module, "evaluate", namespace["adapter_evaluate"])
    monkeypatch.setattr(population_module, "evaluate_population", namespace["population_evaluate"])


def _same_numbers(a: dict, b: dict) -> None:
    for key in ("task", "sft", "elite", "elite_hyperparameters"):
        assert a[key] == b[key], key


def test_a_run_killed_after_its_final_checkpoint_resumes_to_the_original_summary(adapter_evaluate, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    original = run_training(load_config(config, output_dir=str(tmp_path / "straight")))
    assert original["sft"]["reward/total"] == pytest.approx(0.01)  # agent 0, lr 1e-3
    assert original["elite"]["reward/total"] >= 0.02  # a later agent: the SFT numbers would not pass for it

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_LAST_CHECKPOINT, str(config), str(killed)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert json.loads((killed / "checkpoints" / "latest" / "state.json").read_text())["step"] == 2
    assert not (killed / "summary.json").exists()

    resumed = run_training(load_config(resume=str(killed / "checkpoints")))
    _same_numbers(resumed, original)
    assert json.loads((killed / "summary.json").read_text())["elite"] == original["elite"]

    # Resuming the finished run again changes nothing and reports the same numbers.
    before = (killed / "summary.json").read_bytes()
    again = run_training(load_config(resume=str(killed)))
    _same_numbers(again, original)
    assert (killed / "summary.json").read_bytes() == before


def test_a_resume_that_extends_the_run_reuses_its_sft_model_and_logs_each_step_once(adapter_evaluate, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN.replace("sft_steps: 3", "sft_steps: 2"))
    run = tmp_path / "run"
    run_training(load_config(config, output_dir=str(run), sft_cache=False))
    sft_mtime = (run / "sft_model" / "model.safetensors").stat().st_mtime_ns
    # Rows a killed run logged after its checkpoint (step 3): a resume must not keep them.
    with open(run / "metrics.csv", "a") as f:
        f.write("3,agent0/loss,9.0\r\n")
    with open(run / "completions.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "agent": 0, "prompt": "p", "completion": "stale", "reward": 0.0, "parts": {}})
                + "\n")

    resumed = load_config(resume=str(run), max_steps=4)
    assert resumed.max_steps == 4 and resumed.population == 2 and resumed.sft_cache is False
    run_training(resumed)
    assert (run / "sft_model" / "model.safetensors").stat().st_mtime_ns == sft_mtime  # the warm-up did not run
    assert [s for s, _ in read_csv_metrics(run / "metrics.csv")["agent0/loss"]] == [1, 2, 3, 4]
    assert 9.0 not in [v for _, v in read_csv_metrics(run / "metrics.csv")["agent0/loss"]]
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert "stale" not in [s["completion"] for s in samples]
    assert json.loads((run / "config.json").read_text())["max_steps"] == 4


def test_cut_logs_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    # metrics rows count steps done (1..4); completion samples carry the step index (0..3).
    (tmp_path / "metrics.csv").write_text("step,key,value\r\n" + "".join(f"{s},loss,{s}.0\r\n" for s in (1, 2, 3, 4)))
    (tmp_path / "completions.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 1, 2, 3)))
    cut_logs(tmp_path, 2)
    assert read_csv_metrics(tmp_path / "metrics.csv") == {"loss": [(1, 1.0), (2, 2.0)]}
    assert [json.loads(x)["step"] for x in (tmp_path / "completions.jsonl").read_text().splitlines()] == [0, 1]
    cut_logs(tmp_path / "missing", 2)  # a run folder without logs: nothing to do, nothing created
    assert not (tmp_path / "missing").exists()


def test_tensorboard_reads_a_resumed_run_as_one_stream(tmp_path):
    """The resumed writer's purge_step hides the first file's steps from the checkpoint on."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llm_gym.algorithms.run.loggers import TensorBoardLogger

    with TensorBoardLogger(tmp_path) as first:  # killed after step 4; its checkpoint was at step 2
        for step in (1, 2, 3, 4):
            first.log({"loss": step}, step)
    with TensorBoardLogger(tmp_path, purge_step=3) as resumed:
        for step in (3, 4, 5):
            resumed.log({"loss": 10 * step}, step)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
