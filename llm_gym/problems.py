"""Problem sets: a task's problems from its generator or from a Hugging Face dataset.

Generated splits are disjoint by construction: a problem belongs to the test split when a stable
hash of its content falls in the test share, so no seed or size can make a training problem
appear among the held-out ones. An optional validation split (fitness for evolution, so that
selection never looks at the problems of the final table) takes the next share of the hash space,
carved out of the training share: the test split stays the same with or without it. Generated problems are made lazily and cached, so an env of
``size=100_000`` costs nothing until its problems are drawn.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_gym.usage import MissingColumnError, UsageError, looks_like_path

if TYPE_CHECKING:
    from llm_gym.task import Task

__all__ = ["ALL_SPLITS", "ProblemSet", "load_hf_dataset", "split_of", "SPLITS"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
"""The two splits every task has."""
ALL_SPLITS = ("train", "validation", "test")
"""With the optional validation split (``validation_fraction > 0``)."""
_SPLIT_SALT = {"train": 0, "test": 1, "validation": 2}
_MAX_REJECTIONS = 10_000


def problem_key(problem: Mapping[str, Any], columns: Sequence[str]) -> str:
    """A canonical text form of a problem's columns (numpy values made plain)."""

    def plain(v: Any) -> Any:
        return v.tolist() if hasattr(v, "tolist") else v

    return json.dumps({c: plain(problem[c]) for c in columns}, sort_keys=True, default=str)


def split_of(key: str, test_fraction: float, validation_fraction: float = 0.0) -> str:
    """The split a problem belongs to, from a stable hash of its key.

    The hash falls in one of 10,000 buckets: the first ``test_fraction`` of them are the test split,
    the next ``validation_fraction`` the validation split, the rest the training split.

    Args:
        key: The problem's canonical text form.
        test_fraction: Share of the problem space held out for testing.
        validation_fraction: Share held out for validation (fitness); 0 means no validation split.

    Returns:
        ``"train"``, ``"validation"`` or ``"test"``.
    """
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 10_000
    if bucket < test_fraction * 10_000:
        return "test"
    return "validation" if bucket < (test_fraction + validation_fraction) * 10_000 else "train"


def load_hf_dataset(name_or_path: str | Path, split: str | None = "train", config_name: str | None = None) -> Any:
    """Load a dataset through ``datasets``: a hub id, a local data folder, or a ``save_to_disk`` folder.

    Args:
        name_or_path: ``"Jiayi-Pan/Countdown-Tasks-3to4"``, a folder of parquet/json/csv files, or a
            folder written by ``Dataset.save_to_disk``.
        split: The split to take; ``None`` returns what was loaded (a ``Dataset`` or ``DatasetDict``).
        config_name: The hub dataset's configuration (``"main"`` for ``openai/gsm8k``).

    Returns:
        A ``datasets.Dataset`` (or ``DatasetDict`` when ``split`` is ``None``).

    Raises:
        UsageError: if the path does not exist, holds no data, cannot be loaded, or lacks the split.
    """
    import datasets

    path = Path(name_or_path).expanduser()
    if not path.exists() and looks_like_path(str(name_or_path)):
        raise UsageError(f"dataset {name_or_path}: no such folder; give a folder of parquet/json/csv files, a folder "
                         "written by Dataset.save_to_disk, or a hub id")  # fmt: skip
    if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        raise UsageError(f"dataset {name_or_path} is an empty folder: put parquet/json/csv files in it, or "
                         "Dataset.save_to_disk into it")  # fmt: skip
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        try:
            loaded = datasets.load_from_disk(str(path))
        except IndexError:  # datasets fails this way on a saved dataset of 0 rows (0 shards)
            raise UsageError(f"dataset {name_or_path} has no rows: give at least one problem") from None
    else:
        try:
            loaded = datasets.load_dataset(str(name_or_path), config_name)
        except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"dataset {name_or_path}: cannot load it ({first})") from None
    if split is not None and isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UsageError(f"dataset {name_or_path} has no split {split!r}; splits: {sorted(loaded)}")
        return loaded[split]
    return loaded


def check_fractions(test_fraction: float, validation_fraction: float, split: str) -> None:
    """Refuse split shares that leave a split empty.

    Raises:
        ValueError: naming the bad share and a valid one.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if validation_fraction < 0 or test_fraction + validation_fraction >= 1.0:
        raise ValueError(
            f"validation_fraction={validation_fraction} must be >= 0 and leave a training share "
            f"(test_fraction + validation_fraction < 1, test_fraction={test_fraction}); e.g. 0.1"
        )
    if split == "validation" and validation_fraction == 0:
        raise ValueError("the validation split needs validation_fraction > 0 (e.g. 0.1)")


class ProblemSet(Sequence):
    """An indexable, finite set of problems of one task and one split.

    Build one with :meth:`generated` or :meth:`from_dataset`.
    """

    def __init__(self, task: Task, size: int, split: str) -> None:
        if split not in ALL_SPLITS:
            raise ValueError(f"split must be one of {ALL_SPLITS}, got {split!r}")
        if size <= 0:
            raise ValueError(f"a problem set needs at least one problem; got size={size}")
        self.task = task
        self.split = split
        self._size = size
        self._cache: dict[int, dict[str, Any]] = {}
        self._rows: Any = None
        self._config: Any = None
        self._seed = 0
        self._test_fraction = 0.2
        self._validation_fraction = 0.0

    @classmethod
    def generated(
        cls, task: Task, config: Any, *, split: str = "train", size: int = 1000, seed: int = 0,
        test_fraction: float = 0.2, validation_fraction: float = 0.0,
    ) -> ProblemSet:
        """Problems drawn from the task's generator.

        Problem ``i`` is drawn from ``np.random.default_rng([seed, split, i])``, redrawn until its hash
        lands in ``split``: the same ``(seed, split, i)`` always gives the same problem.

        Raises:
            ValueError: if the task has no generator, or the fractions leave no training share (or
                no validation share for ``split="validation"``).
        """
        if task.generate is None:
            raise ValueError(f"{task.env_id} has no generator: pass dataset=<datasets.Dataset>")
        check_fractions(test_fraction, validation_fraction, split)
        problems = cls(task, size, split)
        problems._config, problems._seed, problems._test_fraction = config, seed, test_fraction
        problems._validation_fraction = validation_fraction
        return problems

    @classmethod
    def from_dataset(cls, task: Task, dataset: Any, *, split: str = "train", size: int | None = None) -> ProblemSet:
        """Problems from a ``datasets.Dataset`` (or ``DatasetDict``, of which ``split`` is taken).

        ``size`` keeps the first ``size`` rows (all rows when ``None``).

        Raises:
            MissingColumnError: if a column of the task is missing, naming the dataset's columns (a
                ``KeyError`` too).
            UsageError: if the dataset is empty.
        """
        if isinstance(dataset, Mapping):  # a DatasetDict (it also has column_names: a dict per split)
            if split not in dataset:
                raise UsageError(f"dataset has no split {split!r}; splits: {sorted(dataset.keys())}")
            dataset = dataset[split]
        if len(dataset) == 0:
            raise UsageError(f"the dataset given to {task.env_id} has no rows: give at least one problem")
        columns = list(getattr(dataset, "column_names", None) or dataset[0].keys())
        missing = [c for c in task.columns if c not in columns]
        if missing:
            raise MissingColumnError(
                f"{task.env_id} needs column {missing[0]!r}; the dataset has columns {sorted(columns)}. "
                f"Rename columns to the task's schema {list(task.columns)} (Dataset.rename_column)"
            )
        problems = cls(task, len(dataset) if size is None else min(size, len(dataset)), split)
        problems._rows = dataset
        return problems

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not -self._size <= index < self._size:
            raise IndexError(f"problem {index} out of range for a set of {self._size}")
        index %= self._size
        if index not in self._cache:
            self._cache[index] = self._make(index)
        return dict(self._cache[index])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self._size):
            yield self[i]

    def _make(self, index: int) -> dict[str, Any]:
        if self._rows is not None:
            return self.task.to_problem(self._rows[index])
        rng = np.random.default_rng([self._seed, _SPLIT_SALT[self.split], index])
        for _ in range(_MAX_REJECTIONS):
            problem = self.task.to_problem(self.task.generate(rng, self._config))
            key = problem_key(problem, self.task.columns)
            if split_of(key, self._test_fraction, self._validation_fraction) == self.split:
                return problem
        raise RuntimeError(f"{self.task.env_id}: no {self.split} problem in {_MAX_REJECTIONS} draws")
