"""Evolution (population 4) vs one agent with default hyper-parameters, for the same sampling budget.

Run from the repository root::

    .venv/bin/python -m benchmarks.evolution                  # pop 4 x 20 steps vs 1 x 80 steps
    .venv/bin/python -m benchmarks.evolution --pop-steps 30   # longer

Both arms start from the same cached SFT model (:func:`benchmarks.learning.sft_model`), see the
same task, prompts per step and group size, and train with
:func:`llm_gym.algorithms.finetune_llm_reasoning`. The population arm is 4 agents x ``pop_steps``
steps with :class:`TournamentSelection` (elitism) and :class:`Mutations` every ``evo_steps``; the
single arm is 1 agent x ``4 * pop_steps`` steps with the default hyper-parameters, so both sample
the same number of completions (generated tokens differ only through completion lengths, which
are reported). Held-out metrics: greedy exact accuracy and mean reward on the same fixed test
problems, and the mean reward of 8 samples per problem at T=1 (smooth where greedy is not).
Writes ``benchmarks/results/evolution.json`` and ``evolution.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from typing import Any

import torch

from benchmarks.learning import RESULTS, LearningConfig, build_agent_and_env, peak_rss_mib, sft_model
from llm_gym.algorithms.rollout.rollout import evaluate

logger = logging.getLogger("benchmarks.evolution")


def sampled_reward(agent: Any, env: Any) -> float:
    """Mean total reward of ``group_size`` completions sampled per held-out problem."""
    return evaluate(agent, env, greedy=False)["reward/total"]


def held_out(agent: Any, env: Any) -> dict[str, float]:
    """Greedy accuracy and reward, and sampled reward, on every test problem."""
    agent.test(env)
    agent.fitness.pop()
    greedy = dict(agent.last_eval)
    return {"accuracy": greedy["accuracy"], "reward_greedy": greedy["reward/total"],
            "reward_sampled": sampled_reward(agent, env)}  # fmt: skip


def _lora(config: LearningConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules="all-linear",
                      task_type="CAUSAL_LM", lora_dropout=0.0)  # fmt: skip


def arm(config: LearningConfig, model_path: str, population: int, steps: int, evo_steps: int) -> dict[str, Any]:
    """Train one arm and return its held-out metrics (of the fittest agent) and counts."""
    from llm_gym.algorithms.evolution.mutation import Mutations
    from llm_gym.algorithms.evolution.selection import TournamentSelection
    from llm_gym.algorithms.grpo.population import create_population
    from llm_gym.algorithms.recipe import mutation_genes
    from llm_gym.algorithms.run.loop import finetune_llm_reasoning

    agent, env = build_agent_and_env(config, model_path)
    pop = create_population(population, model_name=model_path, pad_token_id=agent.pad_token_id,
                            pad_token=agent.pad_token, lora_config=_lora(config), batch_size=agent.hps.batch_size,
                            group_size=config.group_size, max_output_tokens=config.max_output_tokens, lr=config.lr,
                            beta=config.beta, temperature=config.temperature, seed=config.seed, device="cpu")  # fmt: skip
    del agent  # only its env is used; the arm builds its own agents
    evolve = population > 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        pop = finetune_llm_reasoning(
            pop, env, evo_steps=evo_steps if evolve else None,
            tournament=TournamentSelection(2, True, population, rand_seed=config.seed) if evolve else None,
            mutation=Mutations(no_mutation=0.2, rl_hp=0.8, mutation_sd=0.1, rand_seed=config.seed,
                               hp_config=mutation_genes(config.beta)) if evolve else None,
            evaluation_interval=evo_steps, max_steps=steps, log_dir=run_dir, verbose=False,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    best = max(pop, key=lambda a: a.fitness[-1] if a.fitness else float("-inf"))
    metrics = held_out(best, env)
    return {
        "population": population, "steps_per_agent": steps,
        "completions_sampled": population * steps * config.prompts_per_step * config.group_size,
        "seconds": seconds, "held_out": metrics, "best_hyperparameters": dataclasses.asdict(best.hps),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pop-steps", type=int, default=20, help="steps of each population member")
    parser.add_argument("--evo-steps", type=int, default=5, help="steps between evolutions")
    parser.add_argument("--sft-steps", type=int, default=80)
    parser.add_argument("--test-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = LearningConfig(sft_steps=args.sft_steps, sft_examples=2000, test_size=args.test_size, seed=args.seed)
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        model_path, sft_info = sft_model(config)
        probe, env = build_agent_and_env(config, model_path)
        sft_metrics = held_out(probe, env)
        del probe
        evolution = arm(config, model_path, 4, args.pop_steps, args.evo_steps)
        single = arm(config, model_path, 1, 4 * args.pop_steps, args.evo_steps)
    finally:
        torch.set_num_threads(previous)
    record = {"config": dataclasses.asdict(config), "sft": {**sft_info, "held_out": sft_metrics},
              "evolution": evolution, "single": single, "peak_rss_mib": peak_rss_mib()}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "evolution.json").write_text(json.dumps(record, indent=2))
    lines = ["| arm | agents x steps | completions | seconds | greedy exact acc. | greedy reward | sampled reward |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines.append(f"| SFT start | - | - | - | {100 * sft_metrics['accuracy']:.1f} % | {sft_metrics['reward_greedy']:.3f} "
                 f"| {sft_metrics['reward_sampled']:.3f} |")  # fmt: skip
    for name, r in (("evolution (best agent)", evolution), ("single agent, defaults", single)):
        m = r["held_out"]
        lines.append(f"| {name} | {r['population']} x {r['steps_per_agent']} | {r['completions_sampled']} | "
                     f"{r['seconds']:.0f} | {100 * m['accuracy']:.1f} % | {m['reward_greedy']:.3f} | "
                     f"{m['reward_sampled']:.3f} |")  # fmt: skip
    table = "\n".join(lines) + "\n"
    (RESULTS / "evolution.md").write_text(table)
    logger.info("\n%s", table)
    return record


if __name__ == "__main__":
    main()
