"""The ``llm-gym`` command line: list environments, evaluate a policy, train.

``llm-gym list`` prints every registered environment id. ``llm-gym eval`` runs a policy (the
task's oracle solver, or a causal LM from a local path / hub id) on a fixed set of held-out
problems, through the same rollout and evaluation as training's fitness
(:func:`llm_gym.algorithms.rollout.rollout.evaluate`), and prints a table of per-part rewards. The
CLI is the one module of the core that wires in the trainers, and it imports them lazily.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import llm_gym
from llm_gym.registry import get_task, list_envs
from llm_gym.table import format_table, held_out_table
from llm_gym.task import Task

__all__ = ["build_parser", "format_table", "main"]

logger = logging.getLogger(__name__)


def _cmd_list(args: argparse.Namespace) -> int:
    rows = [(env_id, get_task(env_id).description) for env_id in list_envs()]
    print(format_table(rows, ["id", "description"]))
    return 0


def _eval_env(task: Task, args: argparse.Namespace, tokenizer: Any) -> Any:
    """A batched env over the first ``-n`` problems of the chosen split, for the shared rollout."""
    from llm_gym.env import build_problems
    from llm_gym.reasoning_gym import ReasoningGym

    size = None if args.dataset else args.num_problems
    problems = build_problems(task, dataset=args.dataset, split=args.split, size=size, seed=args.seed)
    rows = [problems[i] for i in range(min(args.num_problems, len(problems)))]
    # The rows are the env's held-out split (what evaluate() reads); its training split is unused.
    return ReasoningGym(rows, rows, tokenizer, task.rubric.copy(), task.template, data_batch_size_per_gpu=16,
                        correct_part=task.correct_part)  # fmt: skip


def _cmd_eval(args: argparse.Namespace) -> int:
    from llm_gym.algorithms.rollout.policies import ModelPolicy, OraclePolicy
    from llm_gym.algorithms.rollout.rollout import evaluate

    tasks = args.task or [env_id for env_id in list_envs() if get_task(env_id).solve is not None]
    policy_name = args.model or "oracle"
    model_policy, tokenizer = ModelPolicy.from_pretrained(args.model, args.max_new_tokens) if args.model else (None, None)
    rows = []
    for env_id in tasks:
        task = get_task(env_id)
        env = _eval_env(task, args, tokenizer)
        try:
            policy = model_policy if model_policy is not None else OraclePolicy(task, env)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        metrics = evaluate(policy, env)
        parts = {k.removeprefix("reward/"): v for k, v in metrics.items()
                 if k.startswith("reward/") and k not in ("reward/total", "reward/failures")}  # fmt: skip
        for name, value in parts.items():
            rows.append((env_id, policy_name, args.split, name, value))
        rows.append((env_id, policy_name, args.split, "total", metrics["reward/total"]))
        rows.append((env_id, policy_name, args.split, "exact accuracy", metrics["accuracy"]))
        logger.info("%s: %s", env_id, metrics)
    print(format_table(rows, ["env", "policy", "split", "reward part", "mean"]))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from llm_gym.algorithms.recipe import load_config, run_training

    try:
        config = load_config(
            args.config, task=args.task, model=args.model, population=args.population, max_steps=args.max_steps,
            sft_steps=args.sft_steps, output_dir=args.output_dir, resume=args.resume, seed=args.seed,
            threads=args.threads,
        )
    except (ValueError, OSError) as err:
        print(f"llm-gym train: {err}", file=sys.stderr)
        return 2
    if not args.verbose:  # per-step metrics and evaluations of the run, without the libraries' debug noise
        logging.getLogger("llm_gym").setLevel(logging.INFO)
    summary = run_training(config)
    n = int(summary["elite"].get("problems", 0))
    print(f"\nHeld-out results on {n} {config.task} problems (greedy):")
    print(held_out_table({"SFT start": summary["sft"], "elite (GRPO)": summary["elite"]}))
    print(f"\nrun folder: {summary['run_dir']}  ({summary['seconds']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``llm-gym``."""
    parser = argparse.ArgumentParser(prog="llm-gym", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"llm-gym {llm_gym.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command")

    p_list = sub.add_parser("list", help="list the registered environment ids")
    p_list.set_defaults(func=_cmd_list)

    p_eval = sub.add_parser("eval", help="evaluate a policy (the oracle, or a model) and print per-part rewards")
    p_eval.add_argument("--task", action="append", help="environment id (repeatable); default: every task with an oracle")
    p_eval.add_argument("--model", help="local path or hub id of a causal LM; default: the task's oracle solver")
    p_eval.add_argument("--dataset", help="hub id or local folder of a dataset in the task's schema")
    p_eval.add_argument("--split", default="test", choices=("train", "test"))
    p_eval.add_argument("-n", "--num-problems", type=int, default=100)
    p_eval.add_argument("--seed", type=int, default=0)
    p_eval.add_argument("--max-new-tokens", type=int, default=128)
    p_eval.set_defaults(func=_cmd_eval)

    p_train = sub.add_parser(
        "train", help="train: tiny model -> SFT warm-up -> population GRPO with evolution (defaults: all offline)"
    )
    p_train.add_argument("--config", help="YAML file of TrainConfig fields (llm_gym.algorithms.recipe)")
    p_train.add_argument("--task", help="environment id, e.g. llm_gym/Countdown-v0")
    p_train.add_argument("--model", help="local path or hub id of a causal LM (default: the embedded tiny model)")
    p_train.add_argument("--population", type=int, help="agents in the population")
    p_train.add_argument("--max-steps", type=int, help="training steps")
    p_train.add_argument("--sft-steps", type=int, help="SFT warm-up steps (0 skips it)")
    p_train.add_argument("--output-dir", help="run folder (default runs/<time>)")
    p_train.add_argument("--resume", help="checkpoint folder of an earlier run to continue")
    p_train.add_argument("--seed", type=int)
    p_train.add_argument("--threads", type=int, help="torch threads")
    p_train.set_defaults(func=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llm-gym`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
