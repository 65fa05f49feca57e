"""Tests for atomic directory writes, the elite store and RNG state capture."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_gym.algorithms.plumbing.atomic import atomic_directory, atomic_write_text, recover_directory
from llm_gym.algorithms.run.checkpoints import capture_rng_state, restore_rng_state
from llm_gym.algorithms.run.elites import EliteStore


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- atomic_directory


def test_atomic_directory_writes_and_replaces(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.tmp-")
        assert not final.exists()  # nothing visible until the block ends
        (tmp / "a.txt").write_text("v1")
    assert (final / "a.txt").read_text() == "v1"
    with atomic_directory(final) as tmp:
        (tmp / "b.txt").write_text("v2")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]  # replaced, not merged
    assert leftovers(tmp_path) == []


def test_atomic_directory_failure_keeps_old(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text("new, half")
            raise RuntimeError("boom")
    assert (final / "a.txt").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_directory_rejects_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        with atomic_directory(tmp_path / "f"):
            pass


def test_recover_restores_copy_moved_aside_and_cleans_stale_tmp(tmp_path):
    final = tmp_path / "ckpt"
    # State of a writer killed between its two renames: no final, complete old copy, complete tmp.
    old = tmp_path / f".ckpt.old-{dead_pid()}-0123abcd"
    old.mkdir()
    (old / "a.txt").write_text("old")
    stale = tmp_path / f".ckpt.tmp-{dead_pid()}-89abcdef"
    stale.mkdir()
    live = tmp_path / f".ckpt.tmp-{os.getppid()}-deadbeef"  # a live writer's dir is left alone
    live.mkdir()
    recover_directory(final)
    assert (final / "a.txt").read_text() == "old"
    assert leftovers(tmp_path) == [live.name]


WRITER = textwrap.dedent(
    """
    import sys, time
    from llm_gym.algorithms.plumbing.atomic import atomic_directory

    final, versions = sys.argv[1], int(sys.argv[2])
    for version in range(versions):
        with atomic_directory(final) as tmp:
            for i in range(20):
                (tmp / f"part{i}.bin").write_bytes(bytes([version % 256]) * 4096)
                if version == 0 and i == 2:
                    print("writing", flush=True)
                time.sleep(0.002)
            (tmp / "MANIFEST").write_text(str(version))
    print("done", flush=True)
    time.sleep(60)
    """
)


def run_writer_and_kill(final: Path, versions: int, delay: float) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(final), str(versions)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def assert_complete(final: Path) -> int:
    version = int((final / "MANIFEST").read_text())
    parts = sorted(final.glob("part*.bin"))
    assert len(parts) == 20
    assert all(p.read_bytes() == bytes([version % 256]) * 4096 for p in parts)
    return version


def test_sigkill_mid_first_write_leaves_nothing(tmp_path):
    final = tmp_path / "ckpt"
    run_writer_and_kill(final, versions=1, delay=0.0)
    assert not final.exists()  # killed while writing its only version (20 x 2 ms)
    assert len(leftovers(tmp_path)) == 1  # the dead writer's temp dir
    with atomic_directory(final) as tmp:  # the next write cleans it up
        (tmp / "MANIFEST").write_text("x")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("delay", [0.0, 0.13, 0.29])
def test_sigkill_during_replacements_leaves_a_complete_dir(tmp_path, delay):
    final = tmp_path / "ckpt"
    with atomic_directory(final) as tmp:
        for i in range(20):
            (tmp / f"part{i}.bin").write_bytes(bytes([255]) * 4096)
        (tmp / "MANIFEST").write_text("255")
    run_writer_and_kill(final, versions=200, delay=delay)
    recover_directory(final)  # what the next writer or EliteStore does first
    version = assert_complete(final)
    assert version == 255 or 0 <= version < 200
    assert all(".tmp-" not in name for name in leftovers(tmp_path))


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "x.json", "one")
    atomic_write_text(tmp_path / "x.json", "two")
    assert (tmp_path / "x.json").read_text() == "two"
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- EliteStore


def saver(calls: list):
    def save_fn(directory: Path) -> None:
        calls.append(directory.name)
        (directory / "adapter.bin").write_bytes(b"w")

    return save_fn


def test_elite_store_keeps_best_k(tmp_path):
    store = EliteStore(tmp_path / "elites", keep=2)
    calls: list = []
    results = [
        store.save(step, agent, fit, saver(calls), metadata={"hp": {"lr": 1e-3}})
        for step, agent, fit in [(0, 0, 0.5), (1, 1, 0.9), (2, 2, 0.1), (3, 0, 0.7), (4, 3, 0.9), (5, 4, 0.9)]
    ]
    # 0.1 never enters; 0.9 at step 5 ties the worst kept (0.9 at step 4) and loses to the earlier one.
    assert [r is not None for r in results] == [True, True, False, True, True, False]
    assert len(calls) == 4  # save_fn is not called for rejected elites
    kept = ["elite-step000001-agent1-fit0.9000", "elite-step000004-agent3-fit0.9000"]
    assert sorted(p.name for p in store.root.iterdir()) == [*kept, "index.json"]
    assert store.best() == store.root / kept[0]
    index = json.loads((store.root / "index.json").read_text())
    assert [e["path"] for e in index] == kept
    assert index[0] == {
        "path": kept[0],
        "step": 1,
        "agent": 1,
        "fitness": 0.9,
        "metadata": {"hp": {"lr": 1e-3}},
    }
    assert (store.best() / "adapter.bin").read_bytes() == b"w"


def test_elite_store_resume_rebuilds_index_and_shrinks(tmp_path):
    root = tmp_path / "elites"
    store = EliteStore(root, keep=3)
    for step, fit in [(0, 0.2), (1, 0.6), (2, -0.4)]:
        store.save(step, step, fit, saver([]))
    (root / "index.json").unlink()  # e.g. killed after an elite dir was written, before the index
    resumed = EliteStore(root, keep=3)
    assert [e["fitness"] for e in resumed.entries()] == [0.6, 0.2, -0.4]
    assert resumed.entries()[2]["path"] == "elite-step000002-agent2-fit-0.4000"
    smaller = EliteStore(root, keep=1)
    assert [e["path"] for e in smaller.entries()] == ["elite-step000001-agent1-fit0.6000"]
    assert sorted(p.name for p in root.iterdir()) == ["elite-step000001-agent1-fit0.6000", "index.json"]


def test_elite_store_failed_save_changes_nothing(tmp_path):
    store = EliteStore(tmp_path, keep=2)
    store.save(0, 0, 0.5, saver([]))

    def broken(directory):
        (directory / "partial").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.save(1, 1, 0.9, broken)
    assert [e["path"] for e in store.entries()] == ["elite-step000000-agent0-fit0.5000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elite-step000000-agent0-fit0.5000", "index.json"]


def test_elite_store_validation(tmp_path):
    with pytest.raises(ValueError, match="keep=0"):
        EliteStore(tmp_path, keep=0)
    with pytest.raises(ValueError, match="must be finite"):
        EliteStore(tmp_path).save(0, 0, math.nan, saver([]))


# ---------------------------------------------------------------- RNG state


def draw() -> tuple:
    return (
        random.random(),
        float(np.random.rand()),
        torch.rand(3).tolist(),
        torch.randint(0, 10**6, (2,)).tolist(),
    )


def test_rng_state_round_trip_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw()
    state = json.loads(json.dumps(capture_rng_state()))
    expected = draw()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert draw() != expected
    restore_rng_state(state)
    assert draw() == expected
    assert set(state) >= {"python", "numpy", "torch"}
