"""benchmarks/vllm_smoke.py's checks run end to end against the stand-in vLLM (the real run needs a GPU)."""

from __future__ import annotations

import argparse

import pytest
from grpo_tiny import single_thread
from test_vllm_backend import _FakeLLM, fake_vllm  # noqa: F401 - the stand-in vLLM fixture

_one_thread = pytest.fixture(autouse=True)(single_thread)


def test_smoke_checks_measure_the_sleep_on_an_awake_engine(fake_vllm, monkeypatch):  # noqa: F811
    from benchmarks import vllm_smoke
    from llm_gym.tiny import tiny_model_path

    def free_gib():  # the stand-in's GPU: 4 GiB more free while its engine sleeps, all of it once closed
        llm = _FakeLLM.instances[-1] if _FakeLLM.instances else None
        return 10.0 if llm is None or llm.llm_engine.shutdowns else 6.0 if llm.sleeping else 2.0

    monkeypatch.setattr(vllm_smoke, "_free_gib", free_gib)
    args = argparse.Namespace(model=str(tiny_model_path("tiny")), dtype="float32", tokens=4, parity_tokens=2,
                              noise=0.05, max_drift=10.0, gpu_memory_utilization=0.3)  # fmt: skip
    results = vllm_smoke.run_checks(args)
    # before the script's first backend.sleep() the engine sleeps after every call: it must be woken to measure
    assert results["sleep_wake"]["freed_gib"] == 4.0 and results["sleep_wake"]["pass"] is True
    assert results["engine"]["free_gib_after_close"] == 10.0 and _FakeLLM.instances[-1].llm_engine.shutdowns == [1]
