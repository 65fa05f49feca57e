"""One GRPO training step of a population of N agents vs one agent, same workload per agent, same run.

Run from the repository root::

    .venv/bin/python -m benchmarks.population_step --agents 4 --preset small --tokens 128

N agents are LoRA adapters of ONE base (``create_population``-style clones). A population step is
what the training loop does: every agent's completions in one batched decode
(:func:`~llm_gym.algorithms.rollout.population.population_generate`), then each agent scores and
learns on its own. The single-agent step is agent 0 alone (``get_action``: the merged-LoRA decode)
plus its update. Each agent gets the same workload as the single agent (4 prompts x group 8, the
same prompts, ``--tokens`` new tokens). Single and population steps alternate within every round,
so drift of a shared machine hits both alike; the table shows medians over the rounds, and the LAST
line of the output is a JSON object (``agents``, ``preset``, ``single_s``, ``population_s``,
``ratio`` and the generation / update parts). ``--sequential`` also times the population one agent
after another (what the loop did before the batched decode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.workload import Workload, digit_reward, encode_prompts, load, lora, peak_rss_mib


def _score(tok: Any, prompts: Sequence[dict[str, Any]], ids: Sequence[torch.Tensor]) -> torch.Tensor:
    texts = [tok.batch_decode(i[:, p["input_ids"].shape[1] :], skip_special_tokens=True)
             for i, p in zip(ids, prompts, strict=True)]  # completions only  # fmt: skip
    return torch.tensor([digit_reward(t) for t in texts])  # [P, G]


def _tokens(masks: Sequence[torch.Tensor]) -> int:
    return int(sum(int(m.sum()) for m in masks))


def single_step(agent: Any, tok: Any, prompts: Sequence[dict[str, Any]]) -> dict[str, float]:
    """One agent's GRPO step: generate (merged-LoRA decode), score, learn. Returns seconds and tokens."""
    start = time.perf_counter()
    ids, masks = agent.get_action(prompts)
    generated = time.perf_counter()
    agent.learn((ids, masks, _score(tok, prompts, ids)))
    end = time.perf_counter()
    return {"step_s": end - start, "gen_s": generated - start, "learn_s": end - generated, "tokens": _tokens(masks)}


def population_step(agents: Sequence[Any], tok: Any, prompts: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The loop's population step: one batched decode for every agent, then each agent scores and learns."""
    from llm_gym.algorithms.rollout.population import population_generate

    start = time.perf_counter()
    out = population_generate(agents, prompts)
    generated = time.perf_counter()
    for agent, (ids, masks) in zip(agents, out, strict=True):
        agent.learn((ids, masks, _score(tok, prompts, ids)))
    end = time.perf_counter()
    return {"step_s": end - start, "gen_s": generated - start, "learn_s": end - generated,
            "tokens": sum(_tokens(masks) for _, masks in out)}  # fmt: skip


def sequential_step(agents: Sequence[Any], tok: Any, prompts: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The population one agent after another (each a :func:`single_step`): the loop before batching."""
    parts = [single_step(agent, tok, prompts) for agent in agents]
    return {k: sum(p[k] for p in parts) for k in parts[0]}


def build(agents: int, work: Workload) -> tuple[list[Any], Any]:
    """Load the preset and build ``agents`` GRPO agents on one base (agent 0 plus clones)."""
    from llm_gym.algorithms.grpo.agent import GRPO

    model, tok, _ = load(work)
    first = GRPO(
        model, pad_token_id=tok.pad_token_id, pad_token=tok.pad_token, lora_config=lora(work),
        group_size=work.group_size, max_output_tokens=work.max_new_tokens, lr=work.lr, beta=work.beta,
        loss_type="grpo", temperature=1.0, device="cpu", seed=work.seed, adapter_name="agent0",
    )  # fmt: skip
    return [first] + [first.clone(index=i, adapter_name=f"agent{i}") for i in range(1, agents)], tok


def run(agents: int, work: Workload, rounds: int, sequential: bool) -> dict[str, Any]:
    """Warm up, then ``rounds`` rounds alternating single and population steps; medians per kind."""
    pop, tok = build(agents, work)
    encoded = encode_prompts(tok)
    kinds = {"single": lambda p: single_step(pop[0], tok, p), "population": lambda p: population_step(pop, tok, p)}
    if sequential:
        kinds["sequential"] = lambda p: sequential_step(pop, tok, p)
    times: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for rnd in range(work.warmup + rounds):
        prompts = [dict(encoded[(rnd * work.prompts_per_step + j) % len(encoded)]) for j in range(work.prompts_per_step)]
        order = list(kinds) if rnd % 2 == 0 else list(reversed(kinds))
        for kind in order:
            result = kinds[kind](prompts)
            if rnd >= work.warmup:
                times[kind].append(result)
            sys.stderr.write(f"round {rnd}{' (warm-up)' if rnd < work.warmup else ''} {kind}: "
                             f"{result['step_s']:.3f} s (generation {result['gen_s']:.3f} s)\n")  # fmt: skip
    summary: dict[str, Any] = {"agents": agents, "preset": work.preset, "tokens": work.max_new_tokens,
                               "rounds": rounds, "threads": work.threads}  # fmt: skip
    for kind, results in times.items():
        for key in ("step_s", "gen_s", "learn_s", "tokens"):
            value = statistics.median(r[key] for r in results)
            name = f"{kind}_s" if key == "step_s" else f"{kind}_{key}"
            summary[name] = round(value, 4) if key != "tokens" else value
    summary["ratio"] = round(summary["population_s"] / summary["single_s"], 3)
    summary["gen_ratio"] = round(summary["population_gen_s"] / summary["single_gen_s"], 3)
    summary["learn_ratio"] = round(summary["population_learn_s"] / summary["single_learn_s"], 3)
    if sequential:
        summary["sequential_ratio"] = round(summary["sequential_s"] / summary["single_s"], 3)
    summary["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return summary


def table(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (one row per kind of step)."""
    lines = [
        f"GRPO step, preset {summary['preset']!r}, {summary['tokens']} new tokens, 4 prompts x 8 per agent, "
        f"{summary['threads']} torch thread(s), median of {summary['rounds']} alternating round(s).",
        "",
        "| step | agents | step (s) | generation (s) | update (s) | generated tokens | / one agent's step |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in ("single", "population", "sequential"):
        if f"{kind}_s" not in summary:
            continue
        agents = 1 if kind == "single" else summary["agents"]
        ratio = summary[f"{kind}_s"] / summary["single_s"]
        lines.append(f"| {kind} | {agents} | {summary[f'{kind}_s']:.3f} | {summary[f'{kind}_gen_s']:.3f} | "
                     f"{summary[f'{kind}_learn_s']:.3f} | {summary[f'{kind}_tokens']:.0f} | {ratio:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry point; returns the summary (also printed as the last line, as JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per completion")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (one step of each kind per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sequential", action="store_true", help="also time the agents one after another")
    args = parser.parse_args(argv)
    if args.agents < 2:
        parser.error(f"--agents must be >= 2 (a population), got {args.agents}")
    work = Workload(preset=args.preset, max_new_tokens=args.tokens, threads=args.threads, warmup=args.warmup)
    summary = run(args.agents, work, args.rounds, args.sequential)
    sys.stdout.write(table(summary) + "\n" + json.dumps(summary) + "\n")
    return summary


if __name__ == "__main__":
    main()
