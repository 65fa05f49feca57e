"""Every bad input to ``llm-gym`` is one line on stderr naming the value and the fix, status 2, no traceback, nothing written.

Each case runs the real console script in a fresh folder and compares the folder's files before and after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "llm_gym.cli"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


def _write_inputs(root: Path) -> None:
    """Bad config files, bad datasets and a run folder to resume, as a user would have them."""
    import datasets

    for name, text in {"lr.yaml": 'lr: "abc"\n', "pop.yaml": 'population: "4"\n', "steps.yaml": "max_steps: 2.5\n",
                       "broken.yaml": "population: [4\nlr: 1\n", "key.yaml": "populaton: 4\n"}.items():  # fmt: skip
        (root / name).write_text(text)
    datasets.Dataset.from_list([{"nums": [1, 2], "x": 3}]).save_to_disk(str(root / "no_target"))
    datasets.Dataset.from_list([{"nums": [1, 2], "target": 3}]).select([]).save_to_disk(str(root / "no_rows"))
    (root / "empty_dir").mkdir()
    # 20 copies of one problem that hashes into the train split: the held-out split is empty.
    from llm_gym.problems import problem_key, split_of

    row = next({"nums": [1, 2, n], "target": n} for n in range(100)
               if split_of(problem_key({"nums": [1, 2, n], "target": n}, ["nums", "target"]), 0.2) == "train")  # fmt: skip
    datasets.Dataset.from_list([row] * 20).save_to_disk(str(root / "no_test"))
    # A run of 2 agents stopped at step 2 (its checkpoint's state is all a resume reads first).
    run = root / "run"
    (run / "checkpoints" / "latest" / "agent_0").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"population": 2, "max_steps": 4, "sft_steps": 0, "seed": 3}))
    state = {"step": 2, "agents": [{"slot": i, "index": i, "dir": f"agent_{i}"} for i in range(2)]}
    (run / "checkpoints" / "latest" / "state.json").write_text(json.dumps(state))
    (root / "fresh_run" / "checkpoints").mkdir(parents=True)
    (root / "fresh_run" / "config.json").write_text("{}")


CASES = {
    # train: config values, files, flags
    "lr-text": (["train", "--config", "lr.yaml"], "TrainConfig.lr='abc' must be a number such as 0.001 (unquoted in YAML)"),
    "int-as-text": (["train", "--config", "pop.yaml"], "TrainConfig.population='4' must be a whole number such as 4"),
    "int-as-float": (["train", "--config", "steps.yaml"], "TrainConfig.max_steps=2.5 must be a whole number"),
    "broken-yaml": (["train", "--config", "broken.yaml"], "--config broken.yaml is not valid YAML at line 2"),
    "unknown-key": (["train", "--config", "key.yaml"], "unknown train config key 'populaton'; valid keys:"),
    "missing-config": (["train", "--config", "nope.yaml"], "--config nope.yaml: cannot read it"),
    "threads": (["train", "--threads", "-2"], "TrainConfig.threads=-2 must be >= 1"),
    "unknown-task": (["train", "--task", "llm_gym/Countdwn-v0"], "Did you mean llm_gym/Countdown-v0"),
    "bad-knob": (["train", "--task-kwargs", "max_numbr=3"], "task_kwargs: llm_gym/Countdown-v0 got unknown argument 'max_numbr'"),
    "model-path": (["train", "--model", "/nonexistent/path"], "model /nonexistent/path: no such folder"),
    "model-hub-id": (["train", "--model", "nobody/no-such-model"], "model nobody/no-such-model: cannot load it"),
    "argparse-type": (["train", "--population", "abc"], "argument --population: invalid int value: 'abc'"),
    # train --resume
    "resume-nowhere": (["train", "--resume", "nowhere"], "--resume nowhere: no such folder"),
    "resume-not-a-run": (["train", "--resume", "empty_dir"], "--resume empty_dir is not a run folder"),
    "resume-no-checkpoint": (["train", "--resume", "fresh_run"], "has no checkpoint yet"),
    "resume-changed": (["train", "--resume", "run/checkpoints", "--population", "4"],
                       "population=4 differs from the run's population=2"),
    "resume-config-file": (["train", "--resume", "run", "--config", "steps.yaml"], "TrainConfig.max_steps=2.5"),
    "resume-elsewhere": (["train", "--resume", "run", "--output-dir", "other"],
                         "--output-dir other: a resumed run writes to its own folder"),
    "resume-too-short": (["train", "--resume", "run", "--max-steps", "1"],
                         "max_steps=1 is below the checkpoint's step 2: give max_steps >= 2"),
    # eval
    "eval-n-0": (["eval", "-n", "0"], "-n 0: evaluate at least one problem (-n 1 or more)"),
    "eval-n-neg": (["eval", "-n", "-5"], "-n -5: evaluate at least one problem (-n 1 or more)"),
    "eval-unknown-task": (["eval", "--task", "llm_gym/Countdwn-v0"], "Did you mean llm_gym/Countdown-v0"),
    "eval-model-path": (["eval", "--model", "/nonexistent/path"], "--model /nonexistent/path: no such folder"),
    "eval-model-hub-id": (["eval", "--model", "nobody/no-such-model"], "--model nobody/no-such-model: cannot load it"),
    "eval-model-not-a-model": (["eval", "--model", "empty_dir"], "--model empty_dir holds no config.json"),
    "eval-no-column": (["eval", "--task", "llm_gym/Countdown-v0", "--dataset", "no_target"],
                       "llm_gym/Countdown-v0 needs column 'target'"),
    "eval-no-rows": (["eval", "--task", "llm_gym/Countdown-v0", "--dataset", "no_rows"], "dataset no_rows has no rows"),
    "eval-empty-dir": (["eval", "--task", "llm_gym/Countdown-v0", "--dataset", "empty_dir"], "is an empty folder"),
    "eval-no-path": (["eval", "--task", "llm_gym/Countdown-v0", "--dataset", "/nonexistent/data"],
                     "dataset /nonexistent/data: no such folder"),
    "eval-empty-test-split": (["eval", "--task", "llm_gym/Countdown-v0", "--dataset", "no_test"],
                              "none of its 1 distinct problems (20 rows) falls in 'test'"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    _write_inputs(root)
    return root


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_status_2_and_writes_nothing(case, inputs, tmp_path):
    argv, message = CASES[case]
    work = tmp_path / "work"
    import shutil

    shutil.copytree(inputs, work)
    before = _files(work)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "LLM_GYM_CACHE": str(tmp_path / "c"),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    env.pop("LLM_GYM_DEBUG", None)
    proc = subprocess.run([*CLI, *argv], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"llm-gym {argv[0]}: ") and message in lines[0], lines[0]
    assert _files(work) == before  # no run folder, no config.json, no repaired checkpoint
    assert not (tmp_path / "c").exists()


def test_debug_shows_the_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "LLM_GYM_DEBUG": "1"}
    proc = subprocess.run([*CLI, "eval", "-n", "0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "UsageError: -n 0: evaluate" in proc.stderr
