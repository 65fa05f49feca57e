"""Crash-safe directory and file writes: a reader finds the old or the new copy, never half of one.

A directory is written into a hidden temporary sibling (same filesystem, so ``rename`` is atomic),
fsynced, and only then renamed to its final name. Replacing an existing directory takes two
renames, because POSIX cannot atomically swap two non-empty directories::

    final -> .final.old-<pid>-<hex>      (1)  the old copy moves aside
    .final.tmp-<pid>-<hex> -> final      (2)  the new one takes its name
    rm -r .final.old-...                 (3)

A crash between (1) and (2) leaves no ``final`` but a complete ``.old`` copy;
:func:`recover_directory` (run before every write, and by readers such as the elite store on
start) puts it back. A crash before (1) leaves a stale ``.tmp`` directory, which the next write
deletes once its writer process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_write_text", "recover_children", "recover_directory"]

logger = logging.getLogger(__name__)

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-\d+-[0-9a-f]{8}$")


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


def recover_children(root: str | os.PathLike[str]) -> None:
    """Run :func:`recover_directory` for every directory of ``root`` that an interrupted write left behind.

    Args:
        root: A folder holding atomically written directories (e.g. elite checkpoints).
    """
    root = Path(root)
    leftovers = {m["name"] for p in root.iterdir() if (m := _LEFTOVER.match(p.name))}
    for name in sorted(leftovers):
        recover_directory(root / name)
