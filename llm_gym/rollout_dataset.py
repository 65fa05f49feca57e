"""Scored rollouts as a Hugging Face dataset (``--save-dataset DIR``), ready to filter and to SFT on.

One row per scored rollout (failed requests have no answer and are left out; the report counts
them). Columns:

* ``prompt``: the messages sent (role/content; a final assistant message is the template's prefill);
* ``completion``: ``[{"role": "assistant", "content": <answer>}]``; for a multi-turn episode every
  message after the prompt (the model's turns and the env's replies), ending on the model's last turn;
* ``reward`` (total, float), ``correct`` (bool, exact accuracy);
* one float column per rubric part (``format``, ``equation``...);
* ``problem_index`` and ``sample`` (which problem of the split, which of its ``R`` samples);
* the problem's own columns (a problem column whose name is taken above is prefixed ``problem_``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_gym.rollout_record import RolloutRecord

__all__ = ["load_rollouts", "rollout_rows", "save_rollouts"]


def rollout_rows(records: Sequence[RolloutRecord]) -> list[dict[str, Any]]:
    """The dataset rows of the scored records, in (problem, sample) order.

    >>> from llm_gym.rollout_record import RolloutRecord
    >>> r = RolloutRecord(0, 0, [{"role": "user", "content": "1+1?"}], "2", 1.0, True, {"answer": 1.0},
    ...                   columns={"question": "1+1?", "reward": 9})
    >>> row = rollout_rows([r])[0]
    >>> row["completion"], row["reward"], row["answer"], row["problem_reward"]
    ([{'role': 'assistant', 'content': '2'}], 1.0, 1.0, 9)
    """
    rows = []
    for r in sorted((r for r in records if not r.failed), key=lambda r: (r.problem, r.sample)):
        row: dict[str, Any] = {
            "prompt": r.prompt,
            "completion": r.messages,
            "reward": float(r.reward or 0.0),
            "correct": bool(r.correct),
        }
        row.update({name: float(v) for name, v in r.parts.items() if name not in row})
        row.update({"problem_index": r.problem, "sample": r.sample})
        for name, value in r.columns.items():
            row[f"problem_{name}" if name in row else name] = value
        rows.append(row)
    return rows


def save_rollouts(records: Sequence[RolloutRecord], folder: str | os.PathLike[str]) -> Any:
    """Write the scored records as a dataset with ``save_to_disk``.

    Args:
        records: The evaluation's records (failed ones are skipped).
        folder: Output folder.

    Returns:
        The ``datasets.Dataset``.

    Raises:
        ValueError: if no record was scored (there would be no rows).
    """
    import datasets

    rows = rollout_rows(records)
    if not rows:
        raise ValueError(f"no scored rollout to save in {folder}: every request failed")
    dataset = datasets.Dataset.from_list(rows)
    dataset.save_to_disk(str(folder))
    return dataset


def load_rollouts(folder: str | os.PathLike[str]) -> Any:
    """A dataset saved by :func:`save_rollouts` (or any ``save_to_disk`` folder with ``prompt``/``completion``).

    Raises:
        ValueError: if ``folder`` is not a saved dataset, naming the fix.
    """
    import datasets

    path = Path(folder)
    if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        raise ValueError(f"{folder} is not a saved dataset: pass a folder written by llm-gym eval --save-dataset")
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        raise ValueError(f"{folder} holds a DatasetDict ({list(data)}); pass the folder of one split")
    return data
