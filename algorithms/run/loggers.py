"""Run logging: metric loggers (CSV, TensorBoard, W&B) and completion samples (the plot: :mod:`~llm_gym.algorithms.run.plots`).

Every metric logger has the same two methods, ``log(metrics, step)`` and ``close()``, and works as a
context manager; :class:`MultiLogger` fans one call out to several. Metric names are namespaced
strings (``reward/format``, ``loss/policy``, ``evo/fitness_max``); values are anything ``float()``
accepts (python numbers, numpy scalars, 0-d tensors).

The CSV logger writes the *long* format, one row per value: ``step,key,value``. New keys need no
header rewrite, an interrupted run leaves a valid file, and a resumed run appends. Load it with
``pandas.read_csv(path).pivot_table(index="step", columns="key", values="value")`` or
:func:`read_csv_metrics`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CSVLogger",
    "CompletionSampleLog",
    "MetricLogger",
    "MultiLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "cut_logs",
    "make_logger",
    "read_csv_metrics",
]

logger = logging.getLogger(__name__)


def _as_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"Metric name {key!r} must be a non-empty string such as 'loss/policy'.")
        try:
            out[key] = float(value)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"Metric {key!r} has value {value!r} of type {type(value).__name__}, which is not a number: "
                "log scalars only (call .item() on tensors)."
            ) from err
    return out


class MetricLogger:
    """Base class: ``log(metrics, step)`` records scalars, ``close()`` flushes and releases resources."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record scalar metrics at a step.

        Args:
            metrics: Metric name -> number.
            step: Global step (training steps done).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release resources. Safe to call twice."""

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CSVLogger(MetricLogger):
    """Appends ``step,key,value`` rows to one CSV file (see the module docstring).

    Args:
        path: CSV file; created with a header if missing or empty, appended to otherwise (resume).
    """

    HEADER = ("step", "key", "value")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._writer = csv.writer(self._file)
        if fresh:
            self._writer.writerow(self.HEADER)
            self._file.flush()

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append one row per metric and flush (a crash loses nothing already logged).

        Args:
            metrics: Metric name -> number.
            step: Global step.
        """
        for key, value in _as_floats(metrics).items():
            self._writer.writerow((int(step), key, repr(value)))
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        if not self._file.closed:
            self._file.close()


def read_csv_metrics(path: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """Read a :class:`CSVLogger` file back.

    Args:
        path: The CSV file.

    Returns:
        Metric name -> list of ``(step, value)`` in file order.
    """
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            series[row["key"]].append((int(row["step"]), float(row["value"])))
    return dict(series)


def cut_logs(run_dir: str | os.PathLike[str], step: int) -> None:
    """Drop what a run logged after its checkpoint at ``step``, before a resume logs those steps again.

    ``metrics.csv`` keeps the rows of steps ``<= step`` (a row's step counts steps done);
    ``completions.jsonl`` keeps the samples of steps ``< step`` (a sample's step is the index of the
    step that drew it). Each file is rewritten atomically; a missing file is left missing.

    Args:
        run_dir: The run folder.
        step: The checkpoint's step.
    """
    from llm_gym.algorithms.plumbing.atomic import atomic_write_text

    metrics = Path(run_dir) / "metrics.csv"
    if metrics.is_file():
        with open(metrics, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        kept = [row for i, row in enumerate(rows) if i == 0 or (row and int(row[0]) <= step)]
        if len(kept) < len(rows):
            text = io.StringIO()
            csv.writer(text).writerows(kept)  # the same dialect CSVLogger writes
            atomic_write_text(metrics, text.getvalue())
            logger.info("resume: dropped %d rows of metrics.csv logged after step %d", len(rows) - len(kept), step)
    samples = Path(run_dir) / "completions.jsonl"
    if samples.is_file():
        lines = [line for line in samples.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept_lines = [line for line in lines if json.loads(line)["step"] < step]
        if len(kept_lines) < len(lines):
            atomic_write_text(samples, "".join(line + "\n" for line in kept_lines))


class TensorBoardLogger(MetricLogger):
    """Writes scalars with ``torch.utils.tensorboard.SummaryWriter``.

    A resumed run writes a new event file in the same folder; with ``purge_step`` TensorBoard
    hides the earlier files' events from that step on, so the run reads as one stream.

    Args:
        log_dir: Event-file directory.
        purge_step: On resume, the first step the new file writes (the checkpoint's step + 1).

    Raises:
        ImportError: If the ``tensorboard`` package is missing (``pip install tensorboard``).
    """

    def __init__(self, log_dir: str | os.PathLike[str], purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "TensorBoardLogger needs the tensorboard package: pip install tensorboard"
            ) from err
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        self._closed = False

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Add each metric as a scalar at ``step``.

        Args:
            metrics: Metric name -> number.
            step: Global step.
        """
        for key, value in _as_floats(metrics).items():
            self._writer.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        """Flush and close the event file."""
        if not self._closed:
            self._writer.close()
            self._closed = True


def _wandb_credentials_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    if os.environ.get("WANDB_MODE", "").lower() in {"offline", "disabled", "dryrun"}:
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False


class WandbLogger(MetricLogger):
    """Logs to Weights & Biases when it can, and otherwise warns once and does nothing.

    Training never fails because of W&B: a missing ``wandb`` package, missing credentials (no
    ``WANDB_API_KEY``, no ``~/.netrc`` entry, and ``WANDB_MODE`` not ``offline``/``disabled``), a
    failing ``wandb.init`` or a failing ``log`` all log a warning and turn this logger off.

    Args:
        project: W&B project name.
        config: Run configuration to record (hyper-parameters).
        **init_kwargs: Passed to ``wandb.init`` (``name``, ``group``, ``dir``, ...).
    """

    def __init__(
        self, project: str = "llm-gym", config: Mapping[str, Any] | None = None, **init_kwargs: Any
    ) -> None:
        self.enabled = False
        self._run: Any = None
        try:
            import wandb
        except ImportError:
            logger.warning("wb=True but wandb is not installed (pip install wandb): W&B logging is off.")
            return
        if not _wandb_credentials_available():
            logger.warning(
                "wb=True but W&B has no credentials: run `wandb login`, set WANDB_API_KEY, or set "
                "WANDB_MODE=offline. W&B logging is off; CSV/TensorBoard logging goes on."
            )
            return
        try:
            self._run = wandb.init(project=project, config=dict(config or {}), **init_kwargs)
        except Exception as err:  # noqa: BLE001 - any W&B failure must not stop training
            logger.warning("wandb.init failed (%s): W&B logging is off.", err)
            return
        self.enabled = True

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Send metrics to the W&B run (no-op when disabled).

        Args:
            metrics: Metric name -> number.
            step: Global step.
        """
        values = _as_floats(metrics)
        if not self.enabled:
            return
        try:
            self._run.log(values, step=int(step))
        except Exception as err:  # noqa: BLE001 - any W&B failure must not stop training
            logger.warning("wandb log failed (%s): W&B logging is off for the rest of the run.", err)
            self.enabled = False

    def close(self) -> None:
        """Finish the W&B run."""
        if self._run is not None:
            try:
                self._run.finish()
            except Exception as err:  # noqa: BLE001
                logger.warning("wandb finish failed: %s", err)
            self._run = None
        self.enabled = False


class MultiLogger(MetricLogger):
    """Sends every call to several loggers (none at all is a valid, silent logger).

    Args:
        loggers: The loggers to fan out to.
    """

    def __init__(self, loggers: Iterable[MetricLogger] = ()) -> None:
        self.loggers = list(loggers)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log to every logger.

        Args:
            metrics: Metric name -> number.
            step: Global step.
        """
        _as_floats(metrics)  # validate once, so a bad value fails before any logger wrote part of it
        for sink in self.loggers:
            sink.log(metrics, step)

    def close(self) -> None:
        """Close every logger."""
        for sink in self.loggers:
            sink.close()


def make_logger(
    log_dir: str | os.PathLike[str] | None = None,
    *,
    csv: bool = True,
    tensorboard: bool = True,
    wb: bool = False,
    wandb_project: str = "llm-gym",
    config: Mapping[str, Any] | None = None,
    purge_step: int | None = None,
) -> MultiLogger:
    """Build the usual logger set for a run directory.

    Args:
        log_dir: Run directory: ``metrics.csv`` and ``tensorboard/`` go in it. None: no file loggers.
        csv: Write ``log_dir/metrics.csv``.
        tensorboard: Write ``log_dir/tensorboard``; skipped with a warning if tensorboard is missing.
        wb: Also log to W&B (off with a warning when unavailable).
        wandb_project: W&B project name.
        config: Run configuration for W&B.
        purge_step: On resume, the first step logged again (see :class:`TensorBoardLogger`).

    Returns:
        A :class:`MultiLogger` over the loggers that could be created.
    """
    sinks: list[MetricLogger] = []
    if log_dir is not None:
        if csv:
            sinks.append(CSVLogger(Path(log_dir) / "metrics.csv"))
        if tensorboard:
            try:
                sinks.append(TensorBoardLogger(Path(log_dir) / "tensorboard", purge_step=purge_step))
            except ImportError as err:
                logger.warning("%s; TensorBoard logging is off.", err)
    if wb:
        sinks.append(WandbLogger(project=wandb_project, config=config))
    return MultiLogger(sinks)


# --------------------------------------------------------------------------------------------------
# Completion samples
# --------------------------------------------------------------------------------------------------


class CompletionSampleLog:
    """Appends sample completions to a JSONL file, one object per line:
    ``{"step", "agent", "prompt", "completion", "reward", "parts"}``.

    Args:
        path: The JSONL file (appended to; parent directories are created).
        max_chars: Prompts and completions longer than this are cut (with a marker), to keep the
            file readable; None keeps everything.
    """

    def __init__(self, path: str | os.PathLike[str], max_chars: int | None = 4000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_chars = max_chars

    def _cut(self, text: str) -> str:
        if self.max_chars is None or len(text) <= self.max_chars:
            return text
        return text[: self.max_chars] + f"...[{len(text) - self.max_chars} more chars]"

    def write(
        self,
        step: int,
        agent: int,
        prompt: str,
        completion: str,
        reward: float,
        parts: Mapping[str, float] | None = None,
    ) -> None:
        """Append one sample.

        Args:
            step: Training step.
            agent: Agent id.
            prompt: The rendered prompt (or conversation text).
            completion: The model's completion.
            reward: Total reward.
            parts: Reward parts by name (e.g. ``{"format": 1.0, "correct": 0.0}``).
        """
        record = {
            "step": int(step),
            "agent": int(agent),
            "prompt": self._cut(str(prompt)),
            "completion": self._cut(str(completion)),
            "reward": float(reward),
            "parts": {k: float(v) for k, v in (parts or {}).items()},
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All samples written so far (an empty list if the file does not exist)."""
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
