"""Crash-safe checkpoint writes: atomic directories, a keep-best-K elite store, RNG state capture.

A checkpoint directory is written into a hidden temporary sibling (same filesystem, so ``rename``
is atomic), fsynced, and only then renamed to its final name. Replacing an existing directory takes
two renames, because POSIX cannot atomically swap two non-empty directories::

    final -> .final.old-<pid>-<hex>      (1)  the old checkpoint moves aside
    .final.tmp-<pid>-<hex> -> final      (2)  the new one takes its name
    rm -r .final.old-...                 (3)

A crash between (1) and (2) leaves no ``final`` but a complete ``.old`` copy;
:func:`recover_directory` (run before every write and by :class:`EliteStore` on start) puts it
back. A crash before (1) leaves a stale ``.tmp`` directory, which the next write deletes once
its writer process is gone. So after any crash a reader finds either the old or the new complete
directory, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EliteStore",
    "atomic_directory",
    "atomic_write_text",
    "capture_rng_state",
    "recover_directory",
    "restore_rng_state",
]

logger = logging.getLogger(__name__)

ELITE_META = "elite.json"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-\d+-[0-9a-f]{8}$")
INDEX_NAME = "index.json"


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    # Directories need O_RDONLY; fsync on a directory makes the entries (renames) in it durable.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data fsyncs still hold
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                _fsync_path(path)
        _fsync_path(Path(dirpath))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _siblings(final: Path, kind: str) -> list[Path]:
    prefix = f".{final.name}.{kind}-"
    if not final.parent.is_dir():
        return []
    return sorted(p for p in final.parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def _writer_pid(path: Path) -> int | None:
    try:
        return int(path.name.rsplit("-", 2)[-2])
    except (IndexError, ValueError):
        return None


def recover_directory(final_path: str | os.PathLike[str]) -> None:
    """Repair what a killed :func:`atomic_directory` writer left next to ``final_path``.

    Restores a complete old copy if the writer died between its two renames, deletes old copies
    that are no longer needed, and deletes temporary directories whose writer process is dead
    (those of live processes are left alone).

    Args:
        final_path: The checkpoint directory path.
    """
    final = Path(final_path)
    olds = _siblings(final, "old")
    if not final.exists() and olds:
        # Died after moving the old copy aside but before the new one took its name.
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.rename(newest, final)
        _fsync_path(final.parent)
        logger.warning("Recovered %s from %s left by an interrupted write.", final, newest.name)
        olds.remove(newest)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in _siblings(final, "tmp"):
        pid = _writer_pid(tmp)
        if pid is None or not _pid_alive(pid):
            logger.info("Removing stale temporary directory %s.", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a directory so that it appears complete or not at all.

    Yields an empty temporary directory next to ``final_path``. When the block ends normally its
    files are fsynced and it replaces ``final_path`` (see the module docstring for the rename
    protocol). When the block raises, the temporary directory is deleted, ``final_path`` is left as
    it was, and the exception propagates.

    Args:
        final_path: Where the directory should end up. Its parent is created if needed.

    Yields:
        The temporary directory to write into.

    Raises:
        NotADirectoryError: If ``final_path`` exists and is a file.
    """
    final = Path(final_path)
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(
            f"Checkpoint path {final} exists and is a file: remove it or pick another path."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(final)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{tag}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically (temporary sibling, fsync, ``os.replace``).

    Args:
        path: Destination file; its parent must exist.
        text: Content, written as UTF-8.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_path(path.parent)


# --------------------------------------------------------------------------------------------------
# Elite store
# --------------------------------------------------------------------------------------------------


class EliteStore:
    """Keeps the ``keep`` best elite checkpoints of a run, by fitness.

    Each elite is a directory ``root/elite-step{step:06d}-agent{id}-fit{fitness:.4f}/`` written
    atomically by a caller callback, plus an ``elite.json`` inside it with the exact numbers and the
    caller's metadata. ``root/index.json`` lists the kept elites, best first; it is rewritten
    atomically after every change and rebuilt from the ``elite.json`` files on start, so elites
    written just before a crash are not lost.

    Ordering: higher fitness is better; equal fitness keeps the earlier elite (lower step, then
    lower agent id), so a later agent must be strictly better to displace it.

    Args:
        root: Directory holding the elites (created if needed).
        keep: How many elites to keep (>= 1).

    Raises:
        ValueError: If ``keep < 1``.
    """

    def __init__(self, root: str | os.PathLike[str], keep: int = 3) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"EliteStore keep={keep!r} must be an int >= 1.")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        self._entries: list[dict[str, Any]] = []
        self._load()

    @staticmethod
    def _order(entry: Mapping[str, Any]) -> tuple[float, int, int]:
        return (-float(entry["fitness"]), int(entry["step"]), int(entry["agent"]))

    def _load(self) -> None:
        entries = []
        # Leftovers of killed writers: restore moved-aside copies, delete dead writers' temp dirs.
        leftovers = {m["name"] for p in self.root.iterdir() if (m := _LEFTOVER.match(p.name))}
        for name in sorted(leftovers):
            recover_directory(self.root / name)
        for child in sorted(self.root.iterdir()):
            meta = child / ELITE_META
            if child.name.startswith("elite-") and meta.is_file():
                try:
                    entry = json.loads(meta.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError) as err:
                    logger.warning("Ignoring elite %s: unreadable %s (%s).", child, ELITE_META, err)
                    continue
                entry["path"] = child.name
                entries.append(entry)
        self._entries = sorted(entries, key=self._order)
        if entries:
            logger.info("EliteStore %s: resumed with %d elites.", self.root, len(entries))
        self._evict()

    def _evict(self) -> None:
        kept, dropped = self._entries[: self.keep], self._entries[self.keep :]
        self._entries = kept
        self._write_index()
        for entry in dropped:
            shutil.rmtree(self.root / entry["path"], ignore_errors=True)
            logger.info("EliteStore: removed %s (not in the best %d).", entry["path"], self.keep)

    def _write_index(self) -> None:
        atomic_write_text(self.root / INDEX_NAME, json.dumps(self._entries, indent=2, sort_keys=True) + "\n")

    def would_keep(self, fitness: float, step: int = 0, agent: int = 0) -> bool:
        """Whether an elite with this fitness would enter the store.

        Args:
            fitness: Candidate fitness.
            step: Candidate training step (breaks ties).
            agent: Candidate agent id (breaks ties).

        Returns:
            True if the store has room or the candidate beats its worst elite.
        """
        if len(self._entries) < self.keep:
            return True
        candidate = {"fitness": fitness, "step": step, "agent": agent}
        return self._order(candidate) < self._order(self._entries[-1])

    def save(
        self,
        step: int,
        agent: int,
        fitness: float,
        save_fn: Callable[[Path], None],
        metadata: Mapping[str, Any] | None = None,
    ) -> Path | None:
        """Save an elite if it is among the best ``keep``, and drop the one it displaces.

        Args:
            step: Training step of the elite.
            agent: The agent's id.
            fitness: Its fitness (must be finite).
            save_fn: Writes the checkpoint (e.g. ``model.save_pretrained``) into the directory it
                is given; called only if the elite is kept.
            metadata: JSON-able extras stored in ``elite.json`` (hyper-parameters, lineage, ...).

        Returns:
            The elite's directory, or None if it was not good enough to keep.

        Raises:
            ValueError: If ``fitness`` is not finite.
        """
        if not math.isfinite(fitness):
            raise ValueError(
                f"Elite fitness {fitness!r} must be finite: evaluate the agent before saving it."
            )
        if not self.would_keep(fitness, step, agent):
            logger.debug("EliteStore: fitness %.4f does not beat the kept elites; not saved.", fitness)
            return None
        name = f"elite-step{step:06d}-agent{agent}-fit{fitness:.4f}"
        entry = {
            "step": int(step),
            "agent": int(agent),
            "fitness": float(fitness),
            "metadata": dict(metadata or {}),
        }
        with atomic_directory(self.root / name) as tmp:
            save_fn(tmp)
            (tmp / ELITE_META).write_text(
                json.dumps(entry, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        entry["path"] = name
        self._entries = sorted([e for e in self._entries if e["path"] != name] + [entry], key=self._order)
        self._evict()
        logger.info("EliteStore: saved %s.", name)
        return self.root / name

    def best(self) -> Path | None:
        """Directory of the best elite, or None if the store is empty."""
        return self.root / self._entries[0]["path"] if self._entries else None

    def entries(self) -> list[dict[str, Any]]:
        """The kept elites, best first: dicts with path, step, agent, fitness and metadata."""
        return [dict(e) for e in self._entries]


# --------------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Capture the global RNG states of python ``random``, numpy and torch (CPU and every CUDA device).

    Returns:
        A JSON-serialisable dict (lists of ints): ``{"python": ..., "numpy": ..., "torch": ...,
        "torch_cuda": [...]}``; the torch keys are absent when torch is not installed.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    try:
        import torch
    except ImportError:  # torch is optional for this module
        return state
    state["torch"] = torch.get_rng_state().tolist()
    if torch.cuda.is_available():
        state["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states :func:`capture_rng_state` returned.

    Args:
        state: The captured dict (possibly after a JSON round trip).

    Raises:
        ValueError: If the CUDA state was captured with a different number of devices.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" not in state:
        return
    import torch

    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda_states = state.get("torch_cuda")
    if cuda_states is not None and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(
                f"RNG state holds {len(cuda_states)} CUDA device states but {torch.cuda.device_count()} "
                "devices are visible: resume with the same CUDA_VISIBLE_DEVICES."
            )
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda_states])
