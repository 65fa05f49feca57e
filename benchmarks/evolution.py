"""Evolution (population 4) vs one agent with the same hyper-parameters, at equal generated tokens.

Run from the repository root::

    .venv/bin/python -m benchmarks.evolution                  # one seed: pop 4 x 20 steps vs 1 agent
    .venv/bin/python -m benchmarks.evolution --seeds 3        # seeds 0, 1, 2: mean +- s.e. of each arm
    .venv/bin/python -m benchmarks.evolution --quick          # a smoke run of seconds

Both arms start from the same cached SFT model (:func:`benchmarks.learning.sft_model`) of the seed,
see the same task, prompts per step and group size, and start from the same hyper-parameters
(:class:`benchmarks.learning.LearningConfig`). The population arm is 4 agents x ``pop_steps`` steps
of :func:`llm_gym.algorithms.finetune_llm_reasoning` with :class:`TournamentSelection` (elitism) and
:class:`Mutations` every ``evo_steps``; its fitness is exact accuracy on the VALIDATION split (ties
broken by total reward), so selection never reads the test problems. Every token the population
generates is counted (``completion/generated_tokens``); the single arm then trains one agent until it
has generated as many tokens (:func:`benchmarks.learning.train_grpo`). Evaluation time is not part of
either budget. Both are measured on the same TEST problems: greedy exact accuracy (with its standard
error) and mean reward, and the mean reward of ``group_size`` samples per problem.
Writes ``benchmarks/results/evolution.json`` and ``evolution.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from benchmarks.learning import (
    CACHE,
    QUICK,
    RESULTS,
    LearningConfig,
    build_agent_and_env,
    peak_rss_mib,
    seed_summary,
    sft_model,
    train_grpo,
)
from llm_gym.algorithms.rollout.rollout import evaluate
from llm_gym.algorithms.run.loggers import MetricLogger
from llm_gym.algorithms.run.report import accuracy_se

logger = logging.getLogger("benchmarks.evolution")


class TokenCounter(MetricLogger):
    """A metric sink that sums every agent's ``completion/generated_tokens`` over the run."""

    def __init__(self) -> None:
        self.tokens = 0.0

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Add the step's generated tokens (all agents)."""
        self.tokens += sum(float(v) for k, v in metrics.items() if k.endswith("/completion/generated_tokens"))


def held_out(agent: Any, env: Any) -> dict[str, float]:
    """Greedy exact accuracy (+ s.e.) and reward, and the sampled reward, on every test problem."""
    greedy = evaluate(agent, env, split="test")
    return {"accuracy": greedy["accuracy"], "accuracy_se": accuracy_se(greedy["accuracy"], greedy["problems"]),
            "reward_greedy": greedy["reward/total"],
            "reward_sampled": evaluate(agent, env, greedy=False, split="test")["reward/total"]}  # fmt: skip


def _lora(config: LearningConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules="all-linear",
                      task_type="CAUSAL_LM", lora_dropout=0.0)  # fmt: skip


def evolution_arm(config: LearningConfig, model_path: str, steps: int, evo_steps: int) -> dict[str, Any]:
    """4 agents with selection on validation accuracy; returns the elite's test metrics and the tokens spent."""
    from llm_gym.algorithms.evolution.mutation import Mutations
    from llm_gym.algorithms.evolution.selection import TournamentSelection
    from llm_gym.algorithms.grpo.population import create_population
    from llm_gym.algorithms.recipe import mutation_genes
    from llm_gym.algorithms.run.loop import finetune_llm_reasoning

    probe, env = build_agent_and_env(config, model_path)
    pop = create_population(4, model_name=model_path, pad_token_id=probe.pad_token_id, pad_token=probe.pad_token,
                            lora_config=_lora(config), batch_size=probe.hps.batch_size, group_size=config.group_size,
                            max_output_tokens=config.max_output_tokens, lr=config.lr, beta=config.beta,
                            temperature=config.temperature, loss_type=config.loss_type, seed=config.seed,
                            device="cpu")  # fmt: skip
    del probe  # only its env is used
    counter = TokenCounter()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        pop = finetune_llm_reasoning(
            pop, env, evo_steps=evo_steps, tournament=TournamentSelection(2, True, 4, rand_seed=config.seed),
            mutation=Mutations(no_mutation=0.2, rl_hp=0.8, mutation_sd=0.1, rand_seed=config.seed,
                               hp_config=mutation_genes(config.beta)),
            evaluation_interval=evo_steps, max_steps=steps, log_dir=run_dir, verbose=False, loggers=counter,
            fitness="accuracy", fitness_split="validation", eval_problems=config.validation_size,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    best = max(pop, key=lambda a: a.fitness[-1] if a.fitness else float("-inf"))
    return {"agents_x_steps": f"4 x {steps}", "generated_tokens": counter.tokens, "seconds": seconds,
            "held_out": held_out(best, env), "best_hyperparameters": dataclasses.asdict(best.hps)}  # fmt: skip


def single_arm(config: LearningConfig, model_path: str, tokens: float) -> dict[str, Any]:
    """One agent trained until it generated ``tokens`` tokens; its test metrics."""
    agent, env = build_agent_and_env(config, model_path)
    training = train_grpo(agent, env, steps=10**9, seconds=float("inf"), tokens_budget=tokens)
    return {"agents_x_steps": f"1 x {training['steps']}", "generated_tokens": float(training["generated_tokens"]),
            "seconds": training["seconds"], "held_out": held_out(agent, env)}  # fmt: skip


def run_seed(config: LearningConfig, steps: int, evo_steps: int, cache: Path | None) -> dict[str, Any]:
    """SFT start, evolution arm, then the single arm at the evolution arm's token count."""
    model_path, sft_info = sft_model(config, cache)
    probe, env = build_agent_and_env(config, model_path)
    sft_metrics = held_out(probe, env)
    del probe
    evolution = evolution_arm(config, model_path, steps, evo_steps)
    single = single_arm(config, model_path, evolution["generated_tokens"])
    return {"seed": config.seed, "sft": {**sft_info, "held_out": sft_metrics}, "evolution": evolution,
            "single": single,
            "evolution_minus_single_points": 100 * (evolution["held_out"]["accuracy"]
                                                    - single["held_out"]["accuracy"])}  # fmt: skip


def to_markdown(records: list[dict[str, Any]], test_size: int) -> str:
    """Per seed and arm: agents x steps, tokens, seconds, test exact accuracy +- s.e., rewards; then the means."""
    lines = ["| seed | arm | agents x steps | generated tokens | seconds | test exact acc. | greedy reward "
             "| sampled reward |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        s = r["sft"]["held_out"]
        lines.append(f"| {r['seed']} | SFT start | - | - | - | {100 * s['accuracy']:.1f} +- {100 * s['accuracy_se']:.1f} % "
                     f"| {s['reward_greedy']:.3f} | {s['reward_sampled']:.3f} |")  # fmt: skip
        for name in ("evolution", "single"):
            a = r[name]
            m = a["held_out"]
            label = "evolution (elite)" if name == "evolution" else "single agent"
            lines.append(f"| {r['seed']} | {label} | {a['agents_x_steps']} | {a['generated_tokens']:.0f} | "
                         f"{a['seconds']:.0f} | {100 * m['accuracy']:.1f} +- {100 * m['accuracy_se']:.1f} % | "
                         f"{m['reward_greedy']:.3f} | {m['reward_sampled']:.3f} |")  # fmt: skip
    diff = seed_summary([r["evolution_minus_single_points"] for r in records])
    gains = {name: seed_summary([100 * (r[name]["held_out"]["accuracy"] - r["sft"]["held_out"]["accuracy"])
                                 for r in records]) for name in ("evolution", "single")}  # fmt: skip
    lines.append("")
    for name, g in gains.items():
        lines.append(f"{name}: gain over SFT {g['mean']:+.1f} +- {g['se']:.1f} points (mean +- s.e. over {g['seeds']} seeds)")
    lines.append(f"evolution minus single agent: {diff['mean']:+.1f} +- {diff['se']:.1f} points "
                 f"({test_size} test problems per seed)")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pop-steps", type=int, default=20, help="steps of each population member")
    parser.add_argument("--evo-steps", type=int, default=5, help="steps between evolutions")
    parser.add_argument("--sft-steps", type=int, default=800)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--validation-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="seeds --seed .. --seed + N - 1 (SFT included)")
    parser.add_argument("--quick", action="store_true", help="smoke-run budgets; numbers mean nothing")
    parser.add_argument("--no-cache", action="store_true", help="train the SFT models afresh")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: give at least 1 seed")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = LearningConfig(sft_steps=args.sft_steps, test_size=args.test_size, validation_size=args.validation_size,
                            seed=args.seed)  # fmt: skip
    steps, evo_steps = args.pop_steps, args.evo_steps
    if args.quick:
        config = dataclasses.replace(config, **QUICK, validation_size=4)
        steps, evo_steps = 2, 1
    cache = None if args.no_cache else CACHE
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        records = [run_seed(dataclasses.replace(config, seed=config.seed + k), steps, evo_steps, cache)
                   for k in range(args.seeds)]  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    record = {"config": dataclasses.asdict(config), "pop_steps": steps, "evo_steps": evo_steps, "seeds": records,
              "peak_rss_mib": peak_rss_mib()}  # fmt: skip
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "evolution.json").write_text(json.dumps(record, indent=2))
    table = to_markdown(records, config.test_size)
    (args.results_dir / "evolution.md").write_text(table)
    logger.info("\n%s", table)
    return record


if __name__ == "__main__":
    main()
