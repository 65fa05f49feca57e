"""GRPO step time, generated tokens/s and peak memory: llm-gym vs TRL (vs AgileRL where it runs).

Run from the repository root::

    .venv/bin/python -m benchmarks.grpo_step --quick      # tiny model, 32 tokens, ~2 minutes
    .venv/bin/python -m benchmarks.grpo_step              # tiny + small, 32 + 128 tokens, 3 rounds

Every (framework, configuration, round) runs in its own subprocess (so peak RSS is its own),
and frameworks alternate within a round so slow drift of a shared machine hits both alike.
Writes ``benchmarks/results/grpo_step.json`` and ``grpo_step.md``. TRL comes from the ``bench``
extra; AgileRL from ``$AGILERL_PATH`` (a ``pip install --target`` folder) when importable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.workload import RunResult, Workload

logger = logging.getLogger("benchmarks.grpo_step")

RESULTS = Path(__file__).parent / "results"
FRAMEWORKS = ("llm-gym", "trl", "agilerl")


def matmul_rate(threads: int, size: int = 512, seconds: float = 1.0) -> float:
    """Measured fp32 matmul FLOP/s of this machine with ``threads`` threads.

    Args:
        threads: ``torch.set_num_threads`` value.
        size: Square matrix size (512 = the small preset's hidden size).
        seconds: How long to measure.

    Returns:
        FLOP/s (the best of several timed batches).
    """
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        best = max(best, 10 * 2 * size**3 / (time.perf_counter() - start))
    return best


def step_flops(params_matmul: int, prompt_tokens: float, work: Workload, generated: float) -> float:
    """Model FLOPs one GRPO step needs (``2 N`` per token forward; attention and the LoRA terms ignored).

    The work that must be done, counted the same for every framework: each of the ``P`` prompts
    once (not once per group member: a framework that recomputes it ``G`` times does more work
    than the step needs) and every generated token. Generation: prefill of the ``P`` prompts plus
    one forward per generated token. Update: reference forward (``2N``), policy forward (``2N``)
    and its backward to the activations (``2N``: the frozen base needs no weight gradients) over
    the prompts and the completions.

    Args:
        params_matmul: Parameters taking part in matmuls (transformer blocks + LM head).
        prompt_tokens: Mean prompt length.
        work: The configuration.
        generated: Generated tokens in the step.

    Returns:
        FLOPs.
    """
    seq_tokens = work.prompts_per_step * prompt_tokens + generated
    generation = 2 * params_matmul * seq_tokens
    update = (2 + 2 + (2 if work.beta > 0 else 0)) * params_matmul * seq_tokens
    return generation + update


def worker(framework: str, work: Workload) -> RunResult:
    """Run one framework on one configuration in this process."""
    from benchmarks import workload

    try:
        if framework == "llm-gym":
            return workload.run_llm_gym(work)
        if framework == "trl":
            return workload.run_trl(work)
        from benchmarks.agilerl_runner import run_agilerl

        return run_agilerl(work)
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        logger.exception("%s failed", framework)
        return RunResult(framework, dataclasses.asdict(work), error=f"{type(exc).__name__}: {exc}"[:300])


ALLOCATORS = {
    "as-shipped": {},
    "glibc-default": {"LLM_GYM_CPU_ALLOCATOR": "default"},
    "retain-all": {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647:"
                                     "glibc.malloc.top_pad=2147483647"},
}
"""C allocator set-ups: each framework as it ships (llm-gym makes glibc keep freed memory on CPU,
see ``llm_gym.algorithms.plumbing.cpu_allocator``); everyone on glibc's defaults; everyone keeping freed
memory (the same settings through glibc's environment tunables, so the peers get them too)."""


def spawn(framework: str, work: Workload, timeout: float, allocator: str = "as-shipped") -> RunResult:
    """Run :func:`worker` in a fresh interpreter and parse its JSON."""
    env = dict(os.environ, OMP_NUM_THREADS=str(work.threads), MKL_NUM_THREADS=str(work.threads))
    env.update(ALLOCATORS[allocator])
    if framework == "agilerl" and os.environ.get("AGILERL_PATH"):
        env["PYTHONPATH"] = os.pathsep.join([os.environ["AGILERL_PATH"], env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "benchmarks.grpo_step", "--worker", framework,
           "--workload", json.dumps(dataclasses.asdict(work))]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return RunResult(framework, dataclasses.asdict(work), error=f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return RunResult(**json.loads(line))
    tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
    return RunResult(framework, dataclasses.asdict(work), error=f"exit {proc.returncode}: {tail[0][:300]}")


def summarise(runs: list[RunResult], work: Workload, rate: float) -> dict[str, Any]:
    """Median step time, tokens/s, peak memory and FLOP utilisation of each framework on one workload."""
    out: dict[str, Any] = {"workload": work.name}
    for fw in FRAMEWORKS:
        mine = [r for r in runs if r.framework == fw]
        ok = [r for r in mine if r.error is None and r.step_seconds]
        if not ok:
            if mine:
                out[fw] = {"error": mine[0].error}
            continue
        steps = [s for r in ok for s in r.step_seconds]
        tokens = [t for r in ok for t in r.generated_tokens]
        median = statistics.median(steps)
        tok_s = sum(tokens) / sum(steps) if tokens else 0.0
        r0 = ok[0]
        flops = step_flops(r0.matmul_params, r0.prompt_tokens, work, statistics.mean(tokens or [0]))
        out[fw] = {
            "step_s_median": round(median, 4),
            "step_s_all": [round(s, 4) for s in steps],
            "gen_tokens_per_s": round(tok_s, 1),
            "peak_rss_mib": round(max(r.peak_rss_mib for r in ok), 1),
            "step_rss_mib": round(max(r.peak_rss_mib - r.base_rss_mib for r in ok), 1),
            "gflops_per_step": round(flops / 1e9, 3),
            "utilisation": round(flops / median / rate, 4),
        }
    if "step_s_median" in out.get("llm-gym", {}):
        for fw in FRAMEWORKS[1:]:
            if "step_s_median" in out.get(fw, {}):
                out[f"ratio_vs_{fw}"] = round(out["llm-gym"]["step_s_median"] / out[fw]["step_s_median"], 3)
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results as a markdown table."""
    lines = [
        f"GRPO step, {meta['prompts_per_step']} prompts x group {meta['group_size']}, LoRA r16, fp32, "
        f"{meta['threads']} torch thread(s), {meta['steps']} timed steps x {meta['rounds']} round(s) after "
        f"{meta['warmup']} warm-up; machine: {meta['machine']}, matmul {meta['matmul_gflops']:.1f} GFLOP/s; "
        f"C allocator: {meta.get('allocator', 'as-shipped')}. util. = the FLOPs the step needs (each prompt once) "
        "/ step time / matmul rate.",
        "",
        "| workload | framework | median step (s) | gen tok/s | peak RSS (MiB) | step RSS (MiB) | util. | "
        "llm-gym / peer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for fw in FRAMEWORKS:
            if fw not in row:
                continue
            r = row[fw]
            if "error" in r:
                lines.append(f"| {row['workload']} | {fw} | not runnable: {r['error']} | | | | | |")
                continue
            ratio = row.get(f"ratio_vs_{fw}", "")
            lines.append(
                f"| {row['workload']} | {fw} | {r['step_s_median']:.3f} | {r['gen_tokens_per_s']:.0f} | "
                f"{r['peak_rss_mib']:.0f} | {r['step_rss_mib']:.0f} | {100 * r['utilisation']:.1f}% | "
                f"{ratio if ratio != '' else ''} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 32 tokens, 1 round")
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per worker")
    parser.add_argument("--allocator", default="as-shipped", choices=list(ALLOCATORS),
                        help="C allocator set-up of every worker (see ALLOCATORS)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    if args.worker:
        result = worker(args.worker, Workload(**json.loads(args.workload)))
        sys.stdout.write("\n" + json.dumps(dataclasses.asdict(result)) + "\n")
        return 0
    if args.quick:
        args.presets, args.tokens, args.rounds, args.steps = ["tiny"], [32], 1, 3
    rate = matmul_rate(args.threads)
    meta = {
        "prompts_per_step": 4, "group_size": 8, "threads": args.threads, "steps": args.steps,
        "rounds": args.rounds, "warmup": args.warmup, "matmul_gflops": rate / 1e9, "allocator": args.allocator,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }  # fmt: skip
    rows, raw = [], []
    for preset in args.presets:
        for tokens in args.tokens:
            work = Workload(preset=preset, max_new_tokens=tokens, threads=args.threads, warmup=args.warmup,
                            steps=args.steps)  # fmt: skip
            runs = []
            for rnd in range(args.rounds):
                order = args.frameworks if rnd % 2 == 0 else list(reversed(args.frameworks))
                for fw in order:
                    result = spawn(fw, work, args.timeout, args.allocator)
                    logger.info("%s %s round %d: %s", work.name, fw, rnd,
                                result.error or [round(s, 3) for s in result.step_seconds])  # fmt: skip
                    runs.append(result)
                    if fw == "agilerl" and result.error:  # not runnable: do not retry every round
                        args.frameworks = [f for f in args.frameworks if f != "agilerl"]
            rows.append(summarise(runs, work, rate))
            raw.extend(dataclasses.asdict(r) for r in runs)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "grpo_step_quick" if args.quick else "grpo_step"
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": raw}, indent=1))
    table = markdown(rows, meta)
    (args.out / f"{name}.md").write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
