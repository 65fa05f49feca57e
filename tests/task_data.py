"""Local data for the tasks that have no generator, and the skip rule for optional extras.

Nothing here reaches the network: ``tests/assets/gsm8k_sample.jsonl`` holds 24 problems written for
these tests in the schema of ``openai/gsm8k`` (16 train, 8 test rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

ASSETS = Path(__file__).resolve().parent / "assets"


def gsm8k_sample() -> Any:
    """A ``DatasetDict`` with ``train`` and ``test`` splits of ``question``/``answer`` rows."""
    import datasets

    rows = [json.loads(line) for line in (ASSETS / "gsm8k_sample.jsonl").read_text().splitlines()]
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list([{k: r[k] for k in ("question", "answer")} for r in rows if r["split"] == split])
        for split in ("train", "test")
    })


LOCAL_DATA = {"llm_gym/GSM8K-v0": gsm8k_sample}
"""Env id -> builder of local data, for every task without a generator."""


def data_kwargs(env_id: str) -> dict[str, Any]:
    """``{"dataset": <local data>}`` for a task without a generator, else ``{}``.

    Skips the test when the task needs an optional extra that is not installed.
    """
    from llm_gym.registry import get_task, list_task_envs

    if env_id not in list_task_envs():  # a custom env (a multi-turn game) makes its own episodes
        return {}
    task = get_task(env_id)
    missing = task.missing_requirements
    if missing:
        pytest.skip(f"{env_id} needs {', '.join(missing)}, which is not installed: install the task's extra "
                    "(make install installs every extra the tests use)")
    if task.generate is not None:
        return {}
    if env_id not in LOCAL_DATA:
        raise AssertionError(f"{env_id} has no generator: add local data for it to tests/task_data.py")
    return {"dataset": LOCAL_DATA[env_id]()}
