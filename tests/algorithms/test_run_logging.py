"""Tests for metric loggers, the learning-curve plot and the completion sample log."""

from __future__ import annotations

import csv
import logging
import sys

import numpy as np
import pytest
import torch

from llm_gym.algorithms.run.loggers import (
    CompletionSampleLog,
    CSVLogger,
    MetricLogger,
    MultiLogger,
    TensorBoardLogger,
    WandbLogger,
    make_logger,
    read_csv_metrics,
)
from llm_gym.algorithms.run.plots import plot_learning_curve


class ListLogger(MetricLogger):
    def __init__(self):
        self.calls = []
        self.closed = 0

    def log(self, metrics, step):
        self.calls.append((dict(metrics), step))

    def close(self):
        self.closed += 1


def test_csv_logger_long_format_grows_keys_and_resumes(tmp_path):
    path = tmp_path / "run" / "metrics.csv"
    with CSVLogger(path) as log:
        log.log({"loss/policy": 0.5, "reward/format": np.float32(0.25)}, step=1)
        log.log({"loss/policy": torch.tensor(0.125), "evo/fitness_max": 2}, step=2)  # new key
    with CSVLogger(path) as log:  # resume appends, no second header
        log.log({"loss/policy": 0.0625}, step=3)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["step", "key", "value"]
    assert rows[1:] == [
        ["1", "loss/policy", "0.5"],
        ["1", "reward/format", "0.25"],
        ["2", "loss/policy", "0.125"],
        ["2", "evo/fitness_max", "2.0"],
        ["3", "loss/policy", "0.0625"],
    ]
    assert read_csv_metrics(path) == {
        "loss/policy": [(1, 0.5), (2, 0.125), (3, 0.0625)],
        "reward/format": [(1, 0.25)],
        "evo/fitness_max": [(2, 2.0)],
    }


def test_logger_rejects_non_numbers(tmp_path):
    log = CSVLogger(tmp_path / "m.csv")
    with pytest.raises(TypeError, match="'text' has value 'hello'"):
        log.log({"text": "hello"}, step=0)
    with pytest.raises(TypeError, match="non-empty string"):
        log.log({3: 1.0}, step=0)
    log.close()
    log.close()  # idempotent


def test_tensorboard_logger_writes_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TensorBoardLogger(tmp_path / "tb") as log:
        log.log({"reward/total": 0.5}, step=3)
        log.log({"reward/total": 1.5}, step=7)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    scalars = acc.Scalars("reward/total")
    assert [(s.step, s.value) for s in scalars] == [(3, 0.5), (7, 1.5)]


def test_wandb_missing_warns_and_continues(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with caplog.at_level(logging.WARNING):
        log = WandbLogger(project="x")
    assert not log.enabled
    assert "wandb is not installed" in caplog.text
    log.log({"a": 1.0}, step=0)
    log.close()


def test_wandb_without_credentials_warns(monkeypatch, tmp_path, caplog):
    calls = []

    class FakeWandb:
        @staticmethod
        def init(**kwargs):
            calls.append(kwargs)

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with caplog.at_level(logging.WARNING):
        log = WandbLogger()
    assert not log.enabled and calls == []
    assert "WANDB_MODE=offline" in caplog.text


def test_wandb_offline_logs_and_survives_failures(monkeypatch, caplog):
    logged = []

    class Run:
        def log(self, values, step):
            if step == 2:
                raise RuntimeError("network down")
            logged.append((values, step))

        def finish(self):
            logged.append("finished")

    class FakeWandb:
        @staticmethod
        def init(project, config, **kwargs):
            assert project == "p" and config == {"lr": 0.001}
            return Run()

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = WandbLogger(project="p", config={"lr": 0.001})
    assert log.enabled
    log.log({"a": np.float64(1.5)}, step=1)
    with caplog.at_level(logging.WARNING):
        log.log({"a": 2.0}, step=2)
    assert not log.enabled and "network down" in caplog.text
    log.log({"a": 3.0}, step=3)  # silently skipped now
    log.close()
    assert logged == [({"a": 1.5}, 1), "finished"]


def test_multilogger_fans_out_and_validates_first(tmp_path):
    a, b = ListLogger(), ListLogger()
    multi = MultiLogger([a, b])
    multi.log({"x": 1.0}, step=4)
    with pytest.raises(TypeError):
        multi.log({"x": 1.0, "bad": object()}, step=5)
    multi.close()
    assert a.calls == b.calls == [({"x": 1.0}, 4)]
    assert a.closed == b.closed == 1


def test_make_logger_builds_csv_and_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    log = make_logger(tmp_path, wb=True)
    assert [type(s).__name__ for s in log.loggers] == ["CSVLogger", "TensorBoardLogger", "WandbLogger"]
    log.log({"m": 1.0}, step=0)
    log.close()
    assert read_csv_metrics(tmp_path / "metrics.csv") == {"m": [(0, 1.0)]}
    assert any((tmp_path / "tensorboard").iterdir())
    assert make_logger(None).loggers == []


def test_completion_sample_log_appends(tmp_path):
    samples = CompletionSampleLog(tmp_path / "s" / "samples.jsonl", max_chars=5)
    assert samples.read() == []
    samples.write(3, 1, "prompt", "<answer>7</answer>", 1.5, {"format": 1.0, "correct": np.float32(0.5)})
    samples.write(4, 2, "p", "c", 0, None)
    assert samples.read() == [
        {
            "step": 3,
            "agent": 1,
            "prompt": "promp...[1 more chars]",
            "completion": "<answ...[13 more chars]",
            "reward": 1.5,
            "parts": {"format": 1.0, "correct": 0.5},
        },
        {"step": 4, "agent": 2, "prompt": "p", "completion": "c", "reward": 0.0, "parts": {}},
    ]
    assert len((tmp_path / "s" / "samples.jsonl").read_text().splitlines()) == 2


def test_learning_curve_png(tmp_path):
    from matplotlib.image import imread

    records = [
        {"step": 0, "agent": 0, "fitness": 0.1},
        {"step": 0, "agent": 1, "fitness": 0.3},
        {"step": 10, "agent": 1, "fitness": 0.5},
        {"step": 10, "agent": 2, "fitness": 0.4},
        {"step": 20, "agent": 1, "fitness": 0.7},
        {"step": 20, "agent": 2, "fitness": 0.6},
    ]
    events = [
        {"step": 0, "event": "elite", "agent": 1, "parent": 1, "fitness": 0.3},
        {"step": 0, "event": "selected", "agent": 2, "parent": 1, "fitness": 0.3},
        {"step": 0, "event": "mutation", "agent": 2, "hp": "lr", "old": 1e-3, "new": 1.2e-3},
    ]
    out = plot_learning_curve(records, tmp_path / "plots" / "curve.png", events=events, max_fitness=1.0)
    assert out.stat().st_size > 20_000
    image = imread(out)
    assert image.shape[:2] == (600, 1100)  # figsize (11, 6) at 100 dpi: room for the legend outside
    # Not blank: many distinct colours are drawn (lines, markers, text).
    assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 50
    with pytest.raises(ValueError, match="no fitness records"):
        plot_learning_curve([], tmp_path / "empty.png")


def test_learning_curve_of_accuracy_skips_records_without_it(tmp_path):
    records = [{"step": 0, "agent": 0, "fitness": 0.1, "accuracy": 0.05}, {"step": 5, "agent": 0, "fitness": 0.2}]
    out = plot_learning_curve(records, tmp_path / "acc.png", value="accuracy", ylabel="exact accuracy")
    assert out.is_file()
    with pytest.raises(ValueError, match="no fitness records"):
        plot_learning_curve(records[1:], tmp_path / "none.png", value="accuracy")


def test_report_table_and_summary_by_hand():
    from llm_gym.algorithms.run.report import accuracy_se, build_summary, results_table

    sft = {"reward/total": 1.0, "reward/format": 0.9, "accuracy": 0.25, "problems": 400.0}
    elite = {"reward/total": 1.3, "reward/format": 1.0, "accuracy": 0.5, "problems": 400.0}
    summary = build_summary("llm_gym/Countdown-v0", sft, elite, seconds=3.0)
    # s.e. sqrt(0.25 * 0.75 / 400) = 0.021651, sqrt(0.5 * 0.5 / 400) = 0.025; gain s.e. sqrt(sum of squares) = 0.033072
    assert summary["sft"]["accuracy_se"] == pytest.approx(0.021651, abs=1e-6)
    assert summary["elite"]["accuracy_se"] == 0.025
    assert summary["gain"] == 0.25 and summary["gain_se"] == pytest.approx(0.033072, abs=1e-6)
    assert summary["sft"]["accuracy"] == 0.25 and summary["sft"]["problems"] == 400.0 and summary["seconds"] == 3.0
    lines = results_table(summary).splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == ["model", "problems", "exact accuracy", "+- s.e.", "format", "total"]
    assert [c.strip() for c in lines[2].split("|")] == ["SFT start", "400", "0.250", "0.022", "0.900", "1.000"]
    assert lines[-1] == "gain in exact accuracy: +25.0 points (+- 3.3 s.e.)"
    assert accuracy_se(0.5, 0) != accuracy_se(0.5, 0)  # NaN without problems


def test_mutation_labels_of_one_step_get_their_own_rows_above_its_highest_point():
    from llm_gym.algorithms.run.plots import label_slots

    # step 75: three mutated agents at 0.325, 0.32 (the labels printed over each other before) and 0.35
    points = [(75, 0.325), (75, 0.32), (50, 0.285), (75, 0.35), (100, 0.34)]
    assert label_slots(points) == [(0.35, 1), (0.35, 0), (0.285, 0), (0.35, 2), (0.34, 0)]
