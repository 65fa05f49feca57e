"""benchmarks/gpu_check.{sh,py}: what can be checked without a GPU (the python half on CPU, the shell's errors).

The check itself has never run on a GPU here; these tests run its python half on the embedded tiny
model on CPU, in bf16 (the GPU dtype: fp32 LoRA adapters over a bf16 base), with ``--dry`` budgets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import _parse, run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_dry_run_on_cpu_in_bf16_updates_only_lora_and_reports_every_number():
    results = run(_parse(["--device", "cpu", "--dtype", "bf16", "--dry"]))
    assert results["lora_only_ok"] is True
    assert results["base_params_changed"] == 0
    # the tiny model: 2 layers x 7 projections (q k v o gate up down), one lora_B each, x 4 agents
    assert results["lora_b_params"] == 2 * 7 * 4 and results["lora_b_params_unchanged"] == 0
    assert results["population"] == 4 and results["prompts_x_group"] == "2x2" and results["max_new_tokens"] == 8
    assert len(results["step_s_all"]) == 2 and results["step_s_mean"] == results["step_s_all"][1]
    assert results["generated_tokens_per_s"] > 0 and results["peak_gpu_memory_gib"] is None  # no CUDA here


def test_shell_without_the_prepared_carry_says_how_to_make_it(tmp_path):
    env = {**os.environ, "GPU_CHECK_CARRY": str(tmp_path / "missing")}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == (f"gpu_check.sh: {tmp_path / 'missing'} is missing: run 'bash benchmarks/gpu_check.sh "
                           f"--prepare' where PyPI is reachable, then carry {tmp_path / 'missing'}\n")  # fmt: skip
    assert proc.stdout == ""


@pytest.mark.skipif(not (ROOT / "benchmarks" / "gpu_carry" / "wheels").is_dir(),
                    reason="benchmarks/gpu_carry not prepared (bash benchmarks/gpu_check.sh --prepare needs PyPI)")
def test_shell_installs_the_carried_wheels_offline_and_runs_on_cpu(tmp_path):
    from llm_gym.tiny import tiny_model_path

    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "GPU_CHECK_MODEL": str(tiny_model_path())}
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--dtype", "bf16", "--dry"], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lora_only_ok: True" in proc.stdout and proc.stdout.rstrip().endswith("GPU CHECK PASSED")
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    # llm_gym came from the folder the script laid out, not from this checkout's editable install
    assert results["llm_gym_from"].startswith("/tmp/gpu_check_site.") and results["lora_b_params"] == 2 * 7 * 4
