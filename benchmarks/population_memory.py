"""Peak memory of a population of N GRPO agents on one shared base model, N = 1, 2, 4, 8.

Run from the repository root::

    .venv/bin/python -m benchmarks.population_memory [--preset small] [--sizes 1 2 4 8]

Each N runs in a fresh process: load the base, build one agent, :meth:`GRPO.clone` it N - 1
times (new adapters on the SAME base), then one training step as the loop runs it: every agent's
completions in one batched decode, then a ``learn`` per agent. For
contrast, the same population with a deep copy of the base per agent (what cloning a whole
model costs, AgileRL's approach) is measured too. Writes ``benchmarks/results/population_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.workload import Workload, encode_prompts, load, lora, peak_rss_mib, rss_mib

RESULTS = Path(__file__).parent / "results"


def measure(size: int, preset: str, copy_base: bool, tokens: int) -> dict[str, Any]:
    """Build a population of ``size`` agents and train each one step; return memory figures in MiB.

    Args:
        size: Agents in the population.
        preset: Tiny-model preset.
        copy_base: Give each agent its own deep copy of the base (the naive population).
        tokens: Generation budget per completion.

    Returns:
        ``{"size", "copy_base", "base_rss_mib", "peak_rss_mib"}``.
    """
    from llm_gym.algorithms.grpo.agent import GRPO
    from llm_gym.algorithms.rollout.population import population_generate

    work = Workload(preset=preset, max_new_tokens=tokens, threads=1)
    model, tok, _ = load(work)
    base_rss = rss_mib()
    kwargs = dict(pad_token_id=tok.pad_token_id, lora_config=lora(work), group_size=8,
                  max_output_tokens=tokens, beta=0.04, device="cpu", seed=0)  # fmt: skip
    agents = [GRPO(model, **kwargs)]
    for i in range(1, size):
        if copy_base:
            agents.append(GRPO(copy.deepcopy(model), **kwargs))
        else:
            agents.append(agents[0].clone(index=i))
    prompts = encode_prompts(tok, 4)
    # The training loop's step: every agent's completions in one batched decode when they share the
    # base (population_generate falls back to each agent's get_action for copied bases or one agent).
    for agent, (ids, masks) in zip(agents, population_generate(agents, prompts), strict=True):
        agent.learn((ids, masks, torch.rand(len(prompts), 8)))
    return {"size": size, "copy_base": copy_base, "base_rss_mib": round(base_rss, 1),
            "peak_rss_mib": round(peak_rss_mib(), 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=["shared", "copy"], choices=["shared", "copy"],
                        help="shared base (adapters of one model) and/or a deep copy of the base per agent")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        size, copy_base = int(args.worker[0]), args.worker[1] == "copy"
        sys.stdout.write("\n" + json.dumps(measure(size, args.preset, copy_base, args.tokens)) + "\n")
        return 0
    rows = []
    for mode in args.modes:
        for size in args.sizes:
            cmd = [sys.executable, "-m", "benchmarks.population_memory", "--preset", args.preset,
                   "--tokens", str(args.tokens), "--worker", str(size), mode]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=None)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if not lines:
                sys.stderr.write(out.stderr[-2000:])
                continue
            rows.append(json.loads(lines[-1]))
    one = {r["copy_base"]: r["peak_rss_mib"] for r in rows if r["size"] == 1}
    table = [f"Population peak RSS, preset {args.preset!r}, one GRPO step per agent ({args.tokens} new tokens, "
             "4 prompts x 8).", "",
             "| agents | shared base: peak RSS (MiB) | / 1 agent | copied base: peak RSS (MiB) | / 1 agent |",
             "|---|---|---|---|---|"]  # fmt: skip
    for size in args.sizes:
        cells = []
        for mode in (False, True):
            r = next((r for r in rows if r["size"] == size and r["copy_base"] == mode), None)
            if r is None or mode not in one:
                cells += ["n/a", ""]
            else:
                cells += [f"{r['peak_rss_mib']:.0f}", f"{r['peak_rss_mib'] / one[mode]:.2f}x"]
        table.append(f"| {size} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "population_memory.json").write_text(json.dumps(rows, indent=1))
    (args.out / "population_memory.md").write_text("\n".join(table) + "\n")
    sys.stdout.write("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
