"""Evolution vs one agent through the main job itself, at an equal number of completions, per seed.

Run from the repository root::

    .venv/bin/python -m benchmarks.evolution                  # seed 0: llm-gym train vs its single-agent twin
    .venv/bin/python -m benchmarks.evolution --seeds 3        # seeds 0, 1, 2: mean +- s.e. of each arm
    .venv/bin/python -m benchmarks.evolution --set max_steps=100 evo_steps=25   # any TrainConfig field
    .venv/bin/python -m benchmarks.evolution --quick          # a smoke run of seconds; numbers mean nothing

Both arms are :func:`llm_gym.algorithms.recipe.run_training` -- what ``llm-gym train --seed S`` runs --
from the same cached SFT warm-up of the seed (the recipe's own cache), on the same task, prompts per
step, group size and starting hyper-parameters:

* **evolution**: the recipe as configured (defaults: 4 agents x ``max_steps`` steps, tournament
  selection with elitism and mutation every ``evo_steps``; fitness = exact accuracy on the
  validation split, ties broken by total reward). Its elite is the population's arm result, so
  the evolution arm of seed S *is* the demo of seed S.
* **single**: the same config with ``population=1`` and ``max_steps = population x max_steps``:
  as many completions (``prompts_per_step x group_size`` per agent step) as the whole population
  generated, no selection, no mutation.

Both are measured on the seed's test split, which neither training nor selection reads: greedy
exact accuracy with its standard error, and the gain over the SFT start. Generated tokens are
summed from each run's ``metrics.csv``. With ``--runs-dir`` the run folders are kept, and a finished
run found there is reused after the recipe's resume has checked that its settings are the arm's
(so ``llm-gym train --seed S --output-dir DIR/evolution_sS`` counts as the evolution arm). Writes ``benchmarks/results/evolution.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.learning import RESULTS, peak_rss_mib, seed_summary

logger = logging.getLogger("benchmarks.evolution")

QUICK: dict[str, Any] = {"sft_steps": 10, "sft_examples": 64, "sft_batch_size": 8, "sft_teacher": {},
                         "train_size": 32, "test_size": 8, "validation_size": 4, "prompts_per_step": 2,
                         "group_size": 4, "max_output_tokens": 12, "max_steps": 2, "evo_steps": 1,
                         "evaluation_interval": 1, "population": 2}  # fmt: skip
"""``--quick``: a smoke run of seconds (its numbers mean nothing)."""


def generated_tokens(run_dir: str | Path) -> float:
    """Every agent's ``completion/generated_tokens`` over a run, summed from its ``metrics.csv``.

    Args:
        run_dir: A finished ``llm-gym train`` run folder.

    Returns:
        The total number of generated (completion) tokens.
    """
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return sum(float(row["value"]) for row in csv.DictReader(f) if row["key"].endswith("/completion/generated_tokens"))


def _arm(summary: dict[str, Any], config: Any) -> dict[str, Any]:
    return {"agents_x_steps": f"{config.population} x {config.max_steps}",
            "generated_tokens": generated_tokens(summary["run_dir"]), "seconds": summary["seconds"],
            "accuracy": summary["elite"]["accuracy"], "accuracy_se": summary["elite"]["accuracy_se"],
            "gain": summary["gain"], "gain_se": summary["gain_se"],
            "validation_accuracy": summary.get("elite_validation", {}).get("accuracy"),
            "hyperparameters": summary.get("elite_hyperparameters")}  # fmt: skip


def _run_arm(config: Any, run_dir: Path) -> dict[str, Any]:
    """``run_training`` into ``run_dir``; a finished run already there is reused through the recipe's
    resume, which refuses it (UsageError) unless its settings are ``config``'s."""
    from llm_gym.algorithms.recipe import run_training

    if (run_dir / "summary.json").is_file():
        logger.info("reusing the finished run %s (its settings checked by resume)", run_dir)
        return run_training(dataclasses.replace(config, resume=str(run_dir)))
    return run_training(dataclasses.replace(config, output_dir=str(run_dir)))


def run_seed(config: Any, out_dir: Path) -> dict[str, Any]:
    """The evolution arm (``config`` as it is), then the single agent with as many completions.

    Args:
        config: The :class:`~llm_gym.algorithms.recipe.TrainConfig` of the evolution arm (its seed included).
        out_dir: Where both run folders go.

    Returns:
        ``{"seed", "sft", "evolution", "single", "evolution_minus_single_points"}``.
    """
    # A single agent never mutates: its mutation noise stays the default, so one single-agent run
    # serves every evolution variant of a seed (--runs-dir reuses it).
    default_sd = next(f.default for f in dataclasses.fields(config) if f.name == "mutation_sd")
    single_config = dataclasses.replace(config, population=1, max_steps=config.population * config.max_steps,
                                        mutation_sd=default_sd)  # fmt: skip
    evolution = _run_arm(config, out_dir / f"evolution_s{config.seed}")
    single = _run_arm(single_config, out_dir / f"single_s{config.seed}")
    sft = evolution["sft"]
    return {"seed": config.seed, "sft": {"accuracy": sft["accuracy"], "accuracy_se": sft["accuracy_se"],
                                         "problems": sft["problems"]},
            "evolution": _arm(evolution, config), "single": _arm(single, single_config),
            "evolution_minus_single_points": 100 * (evolution["elite"]["accuracy"] - single["elite"]["accuracy"])}  # fmt: skip


def to_markdown(records: list[dict[str, Any]]) -> str:
    """Per seed and arm: agents x steps, tokens, seconds, test exact accuracy +- s.e. and gain; then the means."""
    lines = ["| seed | arm | agents x steps | generated tokens | seconds | test exact acc. | gain over SFT (points) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        s = r["sft"]
        lines.append(f"| {r['seed']} | SFT start | - | - | - | {100 * s['accuracy']:.1f} +- {100 * s['accuracy_se']:.1f} % | - |")
        for name, label in (("evolution", "evolution (elite)"), ("single", "single agent")):
            a = r[name]
            lines.append(f"| {r['seed']} | {label} | {a['agents_x_steps']} | {a['generated_tokens']:.0f} | "
                         f"{a['seconds']:.0f} | {100 * a['accuracy']:.1f} +- {100 * a['accuracy_se']:.1f} % | "
                         f"{100 * a['gain']:+.1f} +- {100 * a['gain_se']:.1f} |")  # fmt: skip
    lines.append("")
    for name in ("evolution", "single"):
        g = seed_summary([100 * r[name]["gain"] for r in records])
        lines.append(f"{name}: gain over SFT {g['mean']:+.1f} +- {g['se']:.1f} points (mean +- s.e. over {g['seeds']} seeds)")
    diff = seed_summary([r["evolution_minus_single_points"] for r in records])
    problems = records[0]["sft"]["problems"] if records else 0
    lines.append(f"evolution minus single agent: {diff['mean']:+.1f} +- {diff['se']:.1f} points "
                 f"({problems:.0f} test problems per seed)")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point: ``--seed``, ``--seeds``, ``--set KEY=VALUE ...``, ``--quick``, ``--results-dir``."""
    from llm_gym.algorithms.recipe import TrainConfig
    from llm_gym.cli import parse_task_kwargs

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="seeds --seed .. --seed + N - 1 (SFT included)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="TrainConfig fields of both arms (values read as JSON), e.g. max_steps=100")
    parser.add_argument("--quick", action="store_true", help="smoke-run budgets; numbers mean nothing")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep the run folders here (default: temporary); a finished run found there with "
                             "the same settings (evolution_s<seed>, single_s<seed>) is reused, not repeated")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: give at least 1 seed")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = {**(QUICK if args.quick else {}), **(parse_task_kwargs(args.set) or {})}
    base = TrainConfig(**overrides)
    if base.population < 2:
        parser.error(f"population={base.population}: the evolution arm needs at least 2 agents")
    with tempfile.TemporaryDirectory(prefix="llm_gym_evolution_") as tmp:
        out_dir = args.runs_dir or Path(tmp)
        records = [run_seed(dataclasses.replace(base, seed=args.seed + k), out_dir) for k in range(args.seeds)]
    record = {"config": dataclasses.asdict(base), "seeds": records, "peak_rss_mib": peak_rss_mib()}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "evolution.json").write_text(json.dumps(record, indent=2))
    table = to_markdown(records)
    (args.results_dir / "evolution.md").write_text(table)
    logger.info("\n%s", table)
    return record


if __name__ == "__main__":
    main()
