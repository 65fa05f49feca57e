"""Incremental JSONL of an evaluation's rollouts, so an interrupted run resumes where it stopped.

The output folder holds ``run.json`` (what was evaluated: task, split, model, sampling...) and
``rollouts.jsonl`` (one :class:`~llm_gym.rollout_record.RolloutRecord` a line, appended and flushed
as each answer arrives). ``--resume`` reads them back: finished answers are not asked again, a
failed one is asked again (its new line supersedes the old one), and a line cut short by a kill
is dropped. Reading keeps the last line of each ``problem:sample`` key, so nothing is duplicated.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from llm_gym.rollout_record import RolloutRecord, jsonable

__all__ = ["RolloutStore", "StoreError"]

logger = logging.getLogger(__name__)

ROLLOUTS = "rollouts.jsonl"
RUN = "run.json"


class StoreError(ValueError):
    """The output folder does not fit the requested run (message names the fix)."""


class RolloutStore:
    """The rollouts of one evaluation in a folder.

    Args:
        folder: The output folder (created on the first write, not before).
        run: What is evaluated (JSON-able); a resumed run must match it.
        resume: Continue the rollouts already in ``folder``.

    Raises:
        StoreError: ``folder`` holds rollouts and ``resume`` is False, or ``resume`` is True and its
            ``run.json`` differs from ``run``.
    """

    def __init__(self, folder: str | os.PathLike[str], run: Mapping[str, Any], *, resume: bool = False) -> None:
        self.folder = Path(folder)
        self.run = jsonable(dict(run))
        self._records: dict[str, RolloutRecord] = {}
        self._file: Any = None
        path = self.folder / ROLLOUTS
        if path.is_file() and path.stat().st_size and not resume:
            raise StoreError(f"{self.folder} holds the rollouts of an earlier eval: pass --resume to continue it, "
                             "or choose another --out")  # fmt: skip
        if resume and (self.folder / RUN).is_file():
            before = json.loads((self.folder / RUN).read_text())
            for key in sorted(set(before) | set(self.run)):
                if before.get(key) != self.run.get(key):
                    raise StoreError(f"--resume: {self.folder} was run with {key}={before.get(key)!r}, not "
                                     f"{self.run.get(key)!r}; pass the same arguments or choose another --out")  # fmt: skip
        if resume and path.is_file():
            self._records = self._read(path)
            logger.info("resuming %s: %d answers done", self.folder, len(self.done))

    @staticmethod
    def _read(path: Path) -> dict[str, RolloutRecord]:
        records: dict[str, RolloutRecord] = {}
        text = path.read_text()
        lines = text.split("\n")
        if not text.endswith("\n"):  # the last line was cut short by a kill: drop it
            lines, cut = lines[:-1], lines[-1]
            logger.warning("%s: dropped a partial last line (%d characters)", path, len(cut))
            path.write_text("\n".join(lines) + ("\n" if lines else ""))
        for line in lines:
            if line.strip():
                record = RolloutRecord.from_json(json.loads(line))
                records[record.key] = record
        return records

    @property
    def done(self) -> set[str]:
        """Keys of the answers obtained (failed ones are asked again)."""
        return {k for k, r in self._records.items() if not r.failed}

    def records(self) -> list[RolloutRecord]:
        """The latest record of every key, in (problem, sample) order."""
        return sorted(self._records.values(), key=lambda r: (r.problem, r.sample))

    def append(self, record: RolloutRecord) -> None:
        """Write one record (a line, flushed and synced) and keep it."""
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / RUN).write_text(json.dumps(self.run, indent=2, sort_keys=True) + "\n")
            self._file = open(self.folder / ROLLOUTS, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._file.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._records[record.key] = record

    def extend(self, records: Iterable[RolloutRecord]) -> None:
        """:meth:`append` each record."""
        for record in records:
            self.append(record)

    def close(self) -> None:
        """Close the file (records stay readable)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RolloutStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
