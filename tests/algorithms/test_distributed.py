"""Data-parallel training on CPU with 2 gloo processes: the update, the evaluation, a whole run and its resume.

The 2-process numbers are compared with the same code run in this (one) process on the same global
batch: the reference is not a hand value but the one-process path that the rest of the suite checks
against hand computations and TRL (``test_loss.py``, ``test_grpo.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_workers import (
    EVAL_WORKER,
    REPO,
    SEED_WORKER,
    UPDATE_CASES,
    UPDATE_WORKER,
    child_env,
    free_port,
    launch,
    one_update,
    tiny_env,
)

from llm_gym.algorithms.rollout.rollout import evaluate
from llm_gym.algorithms.run.distributed import DataParallel, _metric_name, check_processes
from llm_gym.usage import UsageError


def _ok(procs: list[subprocess.CompletedProcess]) -> None:
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r}:\n{p.stderr[-3000:]}"


@pytest.fixture(scope="module")
def two_process_updates(tmp_path_factory):
    """Every case of UPDATE_CASES, run by 2 gloo processes (one launch), per rank."""
    out = tmp_path_factory.mktemp("updates")
    _ok(launch(UPDATE_WORKER, [str(out)]))
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", UPDATE_CASES, ids=lambda c: f"{c[0]}-beta{c[1]}-epochs{c[2]}")
def test_a_two_process_update_equals_the_one_process_update_on_the_same_global_batch(two_process_updates, case):
    loss_type, beta, epochs = case
    ranks = [per_rank[case] for per_rank in two_process_updates]
    reference = one_update(loss_type, beta, epochs)  # this process: no process group, the whole batch
    assert len(reference["grads"]) == epochs and len(ranks[0]["grads"]) == epochs
    for epoch in range(epochs):
        for g0, g1, ref in zip(ranks[0]["grads"][epoch], ranks[1]["grads"][epoch], reference["grads"][epoch],
                               strict=True):  # fmt: skip
            assert torch.equal(g0, g1)  # all-reduced: bit-identical on both processes
            torch.testing.assert_close(g0, ref, rtol=1e-5, atol=1e-7)
    assert any(float(g.abs().max()) > 1e-4 for g in reference["grads"][0])  # the comparison is not of zeros
    for a0, a1, ref in zip(ranks[0]["after"], ranks[1]["after"], reference["after"], strict=True):
        assert torch.equal(a0, a1)  # the same optimizer step on both
        # AdamW's first step is lr * g / (|g| + eps): a gradient near eps turns rounding into up to
        # ~lr/1000 here (measured 9e-6 for one of 128 entries); 1 % of the step lr = 1e-2 bounds it.
        torch.testing.assert_close(a0, ref, rtol=0, atol=1e-4)
    # Each process's loss is its share of the global-batch loss: they add up to it (one epoch only:
    # with two the second epoch's ratio differs per share, and the loss is its mean over epochs).
    if epochs == 1:
        assert ranks[0]["loss"] + ranks[1]["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-7)


def test_a_sharded_evaluation_gathers_the_one_process_numbers(tmp_path):
    _ok(launch(EVAL_WORKER, [str(tmp_path)]))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    from grpo_tiny import make_agent

    env = tiny_env()
    reference = evaluate(make_agent(max_output_tokens=5), env, split="test")
    assert reference["problems"] == 5.0  # batches of 2, 2, 1: process 1 has no prompt in the last one
    for out in ranks:
        assert out["metrics"].keys() == reference.keys()
        for key, value in reference.items():
            assert out["metrics"][key] == pytest.approx(value, abs=1e-6), key
    # An env sharded by its accelerator (AgileRL's layout): each process evaluates its own shard, padded by
    # wrapping around (5 problems -> 0, 2, 4 and 1, 3, 0), so problem 0 counts twice in the gathered numbers.
    padded = evaluate(make_agent(max_output_tokens=5), tiny_env(test_rows=[0, 1, 2, 3, 4, 0]), split="test")
    assert padded["problems"] == 6.0
    for out in ranks:
        assert out["data_sharded"] is True
        for key, value in padded.items():
            assert out["own_shard"][key] == pytest.approx(value, abs=1e-6), key
    # ... and trains in it: 2 steps of its own 2 prompts, the same adapter on both processes afterwards.
    assert [out["trained_prompts"] for out in ranks] == [4, 4]
    assert ranks[0]["adapter_moved"] > 0
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["adapter_after"], ranks[1]["adapter_after"], strict=True))
    assert (tmp_path / "run" / "metrics.csv").is_file()
    # Each process got its share of the training batch: prompt 0 on process 0, prompt 1 on process 1.
    whole = env.reset(reset_dataloaders=True)
    assert [torch.equal(p["input_ids"], q["input_ids"]) for p, q in zip(ranks[0]["prompts"], whole[0::2], strict=True)] == [True]
    assert [torch.equal(p["input_ids"], q["input_ids"]) for p, q in zip(ranks[1]["prompts"], whole[1::2], strict=True)] == [True]


def test_one_process_is_rank_0_of_1_and_every_collective_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dp = DataParallel.from_environment()
    assert (dp.rank, dp.world_size, dp.enabled, dp.is_main) == (0, 1, False, True)
    assert dp.reduce_metrics({"agent0/loss": 1.5}, 4) == {"agent0/loss": 1.5}
    assert dp.prompts_per_process() == [4]
    assert dp.broadcast("x") == "x" and dp.rng_states() is None


def test_metric_names_lose_their_agent_and_phase_prefixes():
    assert _metric_name("agent3/train/reward/failures") == "reward/failures"
    assert _metric_name("agent0/loss") == "loss"
    assert _metric_name("agent1/eval/accuracy") == "accuracy"
    assert _metric_name("data/epoch") == "data/epoch"


@pytest.mark.parametrize(
    ("world", "prompts", "train", "message"),
    [
        (4, 2, 16, r"^--num_processes 4 is more than prompts_per_step=2 \(each process takes a share of every step's "
                   r"prompts\): set prompts_per_step >= 4 or launch --num_processes 2$"),
        (2, 4, 17, r"^train_size=17 leaves a last batch of 1 prompts per epoch for 2 processes: make train_size a "
                   r"multiple of prompts_per_step=4$"),
    ],
)
def test_more_processes_than_the_data_allows_is_one_line_naming_the_fix(monkeypatch, world, prompts, train, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(UsageError, match=message):
        check_processes(prompts, train)
    check_processes(world, 4 * world)  # enough prompts: no error


def test_multi_turn_tasks_and_dynamic_sampling_are_refused_under_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=r"^multi-turn tasks train in one process, not 2: launch without --num_processes$"):
        check_processes(4, 16, multi_turn=True)
    with pytest.raises(UsageError, match=r"^dynamic_sampling refills differ per process, so it trains in one process, "
                                         r"not 2: set dynamic_sampling: false or launch without --num_processes$"):
        check_processes(4, 16, dynamic_sampling=True)


def test_the_env_refuses_a_batch_smaller_than_the_process_count():
    env = tiny_env(batch=1)
    with pytest.raises(UsageError, match=r"^2 processes need at least 2 prompts per step, got prompts_per_step "):
        env.shard_batches(0, 2)
    env = tiny_env(batch=3)  # 4 training problems: a last batch of 1 for 2 processes
    with pytest.raises(UsageError, match=r"^the last training batch of each epoch has 1 prompts "):
        env.shard_batches(1, 2)
    env = tiny_env(batch=2)
    env.shard_batches(1, 2)
    assert len(env.reset()) == 1 and env.num_problems("train") == 4  # its share; the split still counts whole


TINY_RUN = """\
sft_steps: 3
sft_examples: 16
sft_batch_size: 8
population: 2
train_size: 16
test_size: 4
validation_size: 4
prompts_per_step: 2
group_size: 2
max_output_tokens: 8
max_steps: 2
evo_steps: 1
evaluation_interval: 1
lr: 0.001
"""


def _accelerate_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file docs/accelerate/ddp.yaml -m llm_gym.cli train ...``: the documented
    multi-GPU file, which on a machine without CUDA starts its 2 processes on gloo (torchrun)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "docs" / "accelerate" / "ddp.yaml"),
           "--main_process_port", str(free_port()), "-m", "llm_gym.cli", "train", *args]  # fmt: skip
    env = child_env(LLM_GYM_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"))  # no user accelerate config
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_the_deepspeed_file_is_a_zero2_config_of_the_same_launch():
    import yaml

    ddp = yaml.safe_load((REPO / "docs" / "accelerate" / "ddp.yaml").read_text())
    zero2 = yaml.safe_load((REPO / "docs" / "accelerate" / "deepspeed_zero2.yaml").read_text())
    assert (ddp["distributed_type"], zero2["distributed_type"]) == ("MULTI_GPU", "DEEPSPEED")
    assert zero2["deepspeed_config"]["zero_stage"] == 2 and ddp["num_processes"] == zero2["num_processes"] == 2


def test_accelerate_launch_trains_with_two_processes_and_resumes(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    run = tmp_path / "run"
    proc = _accelerate_train(tmp_path, "--config", str(config), "--output-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["sft"]["problems"] == summary["elite"]["problems"] == 4.0  # each test problem once, over both
    # Both took part: 2 steps x 2 agents x 1 prompt each (its share of 2), and each logged its share.
    assert summary["prompts_per_process"] == [4, 4]
    for rank in (0, 1):
        assert f"process {rank} of 2: trains on prompts {rank}::2 of every batch" in proc.stderr
    assert proc.stdout.count("Held-out results") == 1  # process 0 alone prints the table
    state = json.loads((run / "checkpoints" / "latest" / "state.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 2 and len(state["rank_rng"]) == 2
    assert [a["slot"] for a in state["agents"]] == [0, 1]
    for slot in (0, 1):
        assert (run / "checkpoints" / "latest" / f"agent_{slot}" / "adapter_model.safetensors").is_file()

    proc = _accelerate_train(tmp_path, "--resume", str(run), "--max-steps", "3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming at step 2 of 3" in proc.stderr
    state = json.loads((run / "checkpoints" / "latest" / "state.json").read_text())
    assert state["step"] == 3
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows if r[1] == "train/reward_mean"] == [1, 2, 3]  # each step logged once
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["prompts_per_process"] == [2, 2]  # the one resumed step


def test_too_many_processes_from_the_command_line_is_one_line(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN.replace("prompts_per_step: 2", "prompts_per_step: 1"))
    proc = _accelerate_train(tmp_path, "--config", str(config), "--output-dir", str(tmp_path / "run"))
    assert proc.returncode != 0, proc.stderr[-3000:]
    line = ("llm-gym train: --num_processes 2 is more than prompts_per_step=1 (each process takes a share of every "
            "step's prompts): set prompts_per_step >= 2 or launch --num_processes 1")  # fmt: skip
    assert line in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_preparing_an_env_refuses_what_cannot_be_sharded():
    from types import SimpleNamespace

    dp = DataParallel(rank=1, world_size=2)  # no collective is reached before these refusals
    refiller = SimpleNamespace(hps=SimpleNamespace(dynamic_sampling=True))
    with pytest.raises(UsageError, match=r"^dynamic_sampling refills differ per process, so it trains in one process"):
        dp.prepare_env(tiny_env(), [refiller])
    with pytest.raises(UsageError, match=r"^object cannot be sharded over 2 processes \(multi-turn envs train in one "
                                         r"process\): launch without --num_processes$"):
        dp.prepare_env(object())
    env = tiny_env()
    dp.prepare_env(env)
    dp.prepare_env(env)  # twice (the SFT evaluation, then the loop): the same share
    assert env.batch_shard == (1, 2) and not dp.data_sharded


def test_agilerls_tutorial_script_trains_under_two_processes(tmp_path):
    """``finetune_llm_reasoning`` under a launcher, called by an unmodified user script (seed 001)."""
    procs = launch(SEED_WORKER, [], timeout=600, cwd=tmp_path, LLM_GYM_MAX_STEPS="2", LLM_GYM_MAX_OUTPUT_TOKENS="8",
                   LLM_GYM_EVAL_PROBLEMS="10")  # fmt: skip
    _ok(procs)
    for rank, proc in enumerate(procs):
        assert f"process {rank} of 2: trains on prompts {rank}::2 of every batch" in proc.stderr
        assert f"process {rank} of 2: rolled out 10 training prompts" in proc.stderr  # 2 steps x 5 of 10
    (run,) = (tmp_path / "runs").iterdir()  # one run folder: process 0's
    assert "agent0/loss" in (run / "metrics.csv").read_text()
    index = json.loads((tmp_path / "checkpoints" / "index.json").read_text())
    assert len(index) == 1 and index[0]["step"] == 2  # one elite, written once
