"""Resuming a run folder: find its checkpoint, restore its own config, refuse settings that would change it.

A run folder (``llm-gym train`` writes one) holds ``config.json``, the settings it ran with, and
``checkpoints/latest/``, the whole population at the last checkpoint. Resuming reads both before
anything is built or written, so a wrong path or a wrong flag costs nothing and leaves the folder
as it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_gym.algorithms.run.checkpoints import STATE_FILE
from llm_gym.usage import UsageError

__all__ = ["CONFIG_FILE", "RESUMABLE", "ResumePoint", "find_resume_point", "merge_resumed_config"]

CONFIG_FILE = "config.json"
"""The run's settings, written when the run starts."""
RESUMABLE = ("max_steps", "threads")
"""Settings a resume may change: they change how long or how fast the run goes, not what it computes."""
_RESUME_OWN = ("resume", "output_dir")  # the resume's own settings


@dataclass(frozen=True)
class ResumePoint:
    """Where a resume continues: the run folder, its checkpoint and what the checkpoint records."""

    run_dir: Path
    """The run folder (holds ``config.json``, ``checkpoints/``, ``metrics.csv``)."""
    checkpoint: Path
    """The population checkpoint (``<run>/checkpoints/latest``)."""
    step: int
    """Training steps the checkpoint holds."""
    agents: int
    """Agents in the checkpoint."""
    base_model: str | None
    """The model the agents' adapters sit on (the SFT model), as the checkpoint records it."""
    saved_config: dict[str, Any]
    """The run's ``config.json``."""
    max_reward_reached: bool = False
    """Whether the run had stopped here because its best fitness reached ``max_reward``."""


def _state_file(checkpoint: Path) -> Path | None:
    """``state.json`` of a checkpoint, or of the complete copy a write killed between its renames left aside."""
    if (checkpoint / STATE_FILE).is_file():
        return checkpoint / STATE_FILE
    aside = sorted(checkpoint.parent.glob(f".{checkpoint.name}.old-*/{STATE_FILE}"))
    return aside[-1] if aside else None


def find_resume_point(resume: str | Path) -> ResumePoint:
    """Read a run folder for resuming, without writing anything.

    Args:
        resume: The run folder, its ``checkpoints/`` folder or ``checkpoints/latest``.

    Returns:
        The run folder, checkpoint, step, population size, base model and saved config.

    Raises:
        UsageError: when the path does not exist, is not a run folder, or holds no checkpoint.
    """
    from llm_gym.algorithms.grpo.checkpoint import AGENT_FILE

    path = Path(resume)
    if not path.is_dir():
        raise UsageError(f"--resume {resume}: no such folder; give the run folder (runs/<time>) of an earlier run")
    candidates = [path, path.parent, path.parent.parent]
    run_dir = next((c for c in candidates if (c / CONFIG_FILE).is_file() and (c / "checkpoints").is_dir()), None)
    if run_dir is None:
        raise UsageError(f"--resume {resume} is not a run folder: expected {CONFIG_FILE} and checkpoints/ in it; "
                         "give the folder that llm-gym train wrote (runs/<time>)")  # fmt: skip
    checkpoint = run_dir / "checkpoints" / "latest"
    state_file = _state_file(checkpoint)
    if state_file is None:
        raise UsageError(f"--resume {resume}: {run_dir} has no checkpoint yet (the run stopped before its first one, "
                         "written every evo_steps steps); start the run again without --resume")  # fmt: skip
    try:
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"--resume {resume}: cannot read the run's {CONFIG_FILE} or checkpoint ({err})") from None
    agent_file = state_file.parent / state["agents"][0]["dir"] / AGENT_FILE if state.get("agents") else None
    base = json.loads(agent_file.read_text()).get("base_model") if agent_file and agent_file.is_file() else None
    return ResumePoint(run_dir=run_dir, checkpoint=checkpoint, step=int(state["step"]), agents=len(state["agents"]),
                       base_model=base or None, saved_config=saved, max_reward_reached=bool(state.get("max_reward_reached")))  # fmt: skip


def merge_resumed_config(point: ResumePoint, given: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """The run's own settings, with the resumable ones of ``given`` applied.

    Args:
        point: The resume point (its ``saved_config``).
        given: Settings given with the resume (a config file's and the flags'); every one that is not
            in :data:`RESUMABLE` must equal the run's.
        fields: The config's field names (a saved key the config no longer has is dropped).

    Returns:
        Field values for the config class: the saved ones, ``RESUMABLE`` ones from ``given``,
        ``resume`` set to the checkpoint and ``output_dir`` to the run folder.

    Raises:
        UsageError: naming the first setting that differs from the run's, or an ``output_dir``
            other than the run folder.
    """
    fields = set(fields)
    values = {k: v for k, v in point.saved_config.items() if k in fields and k not in _RESUME_OWN}
    out = given.get("output_dir")
    if out is not None and Path(out).resolve() != point.run_dir.resolve():
        raise UsageError(f"--output-dir {out}: a resumed run writes to its own folder {point.run_dir}; "
                         "drop --output-dir (or copy the run folder and resume the copy)")  # fmt: skip
    for key, value in given.items():
        if key in _RESUME_OWN or key in RESUMABLE or key not in values:
            continue
        if _normal(value) != _normal(values[key]):
            raise UsageError(f"{key}={value!r} differs from the run's {key}={values[key]!r} ({point.run_dir / CONFIG_FILE}): "
                             f"a resume keeps the run's settings, only {', '.join(RESUMABLE)} may change; "
                             f"drop {key} or start a new run")  # fmt: skip
    values.update({k: given[k] for k in RESUMABLE if k in given})
    values.update(resume=str(point.checkpoint), output_dir=str(point.run_dir))
    return values


def _normal(value: Any) -> Any:
    """A value as it reads back from JSON (tuples become lists), for comparing with the saved config."""
    return json.loads(json.dumps(value))
