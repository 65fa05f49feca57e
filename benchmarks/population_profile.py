"""Where a population step's time goes: generation parts vs the per-agent update parts, 1 vs N agents.

Run from the repository root::

    nice -n 19 .venv/bin/python -m benchmarks.population_profile --agents 4 --preset small --tokens 128

Same workload and steps as :mod:`benchmarks.population_step` (single and population steps alternate
within the process), with wall-clock timers wrapped around the parts: in generation the model
forwards and the KV-cache compactions (rows leaving the batch); in the update the reference
forward, the policy forward, the backward, gradient clipping and the optimizer step. The LAST line
is a JSON object: per kind of step, the median seconds of each part.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks.population_step import build, population_step, single_step
from benchmarks.workload import Workload, encode_prompts

TIMES: collections.Counter[str] = collections.Counter()
COUNTS: collections.Counter[str] = collections.Counter()


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - start
            COUNTS[name] += 1

    return wrapper


@contextlib.contextmanager
def instrumented(agents: list[Any]) -> Iterator[None]:
    """Wrap the parts of a step in timers (restored on exit)."""
    from llm_gym.algorithms.grpo import update
    from llm_gym.algorithms.plumbing import kv_cache

    saved = [(update, "frozen_logps"), (update, "policy_logps"), (torch.Tensor, "backward"),
             (torch.nn.utils, "clip_grad_norm_"), (kv_cache.PreallocatedLayer, "batch_select_indices")]  # fmt: skip
    originals = [getattr(obj, name) for obj, name in saved]
    update.frozen_logps = _timed("update/reference_forward", update.frozen_logps)
    torch.Tensor.backward = _timed("update/backward", torch.Tensor.backward)
    torch.nn.utils.clip_grad_norm_ = _timed("update/clip", torch.nn.utils.clip_grad_norm_)
    kv_cache.PreallocatedLayer.batch_select_indices = _timed(
        "gen/kv_compaction_per_layer", kv_cache.PreallocatedLayer.batch_select_indices
    )
    steps = []
    for agent in agents:
        agent._logps = _timed("update/policy_forward", agent._logps)  # instance attribute shadows the method
        steps.append(agent.optimizer.step)
        agent.optimizer.step = _timed("update/optimizer", agent.optimizer.step)
    model = agents[0].model
    forward = model.forward
    model.forward = _timed("model_forward", forward)
    try:
        yield
    finally:
        for (obj, name), original in zip(saved, originals, strict=True):
            setattr(obj, name, original)
        for agent, step in zip(agents, steps, strict=True):
            del agent._logps
            agent.optimizer.step = step
        model.forward = forward


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry point; returns (and prints as the last line) the medians per part."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    work = Workload(preset=args.preset, max_new_tokens=args.tokens, threads=1, warmup=args.warmup)
    pop, tok = build(args.agents, work)
    encoded = encode_prompts(tok)
    kinds = {"single": lambda p: single_step(pop[0], tok, p), "population": lambda p: population_step(pop, tok, p)}
    parts: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    with instrumented(pop):
        for rnd in range(work.warmup + args.rounds):
            prompts = [dict(encoded[(rnd * work.prompts_per_step + j) % len(encoded)])
                       for j in range(work.prompts_per_step)]  # fmt: skip
            for kind in list(kinds) if rnd % 2 == 0 else list(reversed(kinds)):
                TIMES.clear()
                COUNTS.clear()
                result = kinds[kind](prompts)
                row = {**result, **{k: round(v, 3) for k, v in TIMES.items()},
                       "kv_compactions_per_layer": COUNTS["gen/kv_compaction_per_layer"]}  # fmt: skip
                sys.stderr.write(f"round {rnd} {kind}: {json.dumps(row)}\n")
                if rnd >= work.warmup:
                    parts[kind].append(row)
    summary: dict[str, Any] = {"agents": args.agents, "preset": args.preset, "tokens": args.tokens}
    for kind, rows in parts.items():
        keys = sorted({k for r in rows for k in r})
        summary[kind] = {k: round(statistics.median(r.get(k, 0.0) for r in rows), 3) for k in keys}
    sys.stdout.write(json.dumps(summary) + "\n")
    return summary


if __name__ == "__main__":
    main()
