"""The ``llm-gym`` command line: list environments, evaluate a policy, train.

``llm-gym list`` prints every registered environment id. ``llm-gym eval`` runs a policy (the
task's oracle solver, or a causal LM from a local path / hub id) through the environment on a
fixed set of held-out problems and prints a table of per-part rewards. The CLI is the one module
of the core that wires in the trainers, and it imports them lazily.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym

import llm_gym
from llm_gym.env import ReasoningEnv
from llm_gym.registry import env_description, get_task, list_envs, list_task_envs

__all__ = ["main", "evaluate_policy", "format_table"]

logger = logging.getLogger(__name__)

Policy = Callable[[list[dict[str, Any]], list[dict[str, Any]]], list[str]]  # (observations, problems) -> completions


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table with right-aligned numbers.

    Args:
        rows: Table rows; floats print with 3 decimals.
        header: Column titles.

    Returns:
        The table as a string (no trailing newline).
    """

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    cells = [[cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(header))]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    for row in cells:
        lines.append(
            " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True))
        )
    return "\n".join(lines)


def evaluate_policy(env: ReasoningEnv, policy: Policy, num_problems: int, batch_size: int = 16) -> dict[str, float]:
    """Run ``policy`` on the first ``num_problems`` problems of ``env`` and average the rewards.

    Args:
        env: A reasoning env (its split decides which problems are used).
        policy: Maps observations and their problems to one completion each.
        num_problems: How many problems, taken in order from problem 0.
        batch_size: Observations handed to the policy at once.

    Returns:
        ``reward/total``, ``reward/<part>`` for every rubric part, ``accuracy`` and ``failures``
        (reward functions that raised or timed out).
    """
    num_problems = min(num_problems, len(env.problems))
    totals: list[float] = []
    parts: dict[str, list[float]] = {name: [] for name in env.rubric.names}
    correct, failures = 0, 0
    for start in range(0, num_problems, batch_size):
        indices = range(start, min(start + batch_size, num_problems))
        observations = [env.reset(seed=0, options={"index": i})[0] for i in indices]
        completions = policy(observations, [env.problems[i] for i in indices])
        for i, completion in zip(indices, completions, strict=True):
            env.reset(options={"index": i})
            _, reward, _, _, info = env.step(completion)
            totals.append(reward)
            for name, value in info["rewards"].items():
                parts[name].append(value)
            correct += info["correct"]
            failures += len(info["reward_errors"])
    n = max(len(totals), 1)
    metrics = {"reward/total": sum(totals) / n}
    metrics.update({f"reward/{name}": sum(values) / n for name, values in parts.items()})
    metrics["accuracy"] = correct / n
    metrics["failures"] = float(failures)
    return metrics


def _oracle_policy(env: ReasoningEnv) -> Policy:
    task = env.task
    if task.solve is None:
        raise SystemExit(f"{task.env_id} has no oracle solver: pass --model")
    return lambda observations, problems: [task.solve(p) or "" for p in problems]


def _model_policy(model_id: str, max_new_tokens: int) -> tuple[Policy, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    model = AutoModelForCausalLM.from_pretrained(model_id)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    @torch.no_grad()
    def policy(observations: list[dict[str, Any]], problems: list[dict[str, Any]]) -> list[str]:
        batch = tokenizer([o["prompt"] for o in observations], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    return policy, tokenizer


def _cmd_list(args: argparse.Namespace) -> int:
    rows = [(env_id, env_description(env_id)) for env_id in list_envs()]
    print(format_table(rows, ["id", "description"]))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    tasks = args.task or [env_id for env_id in list_task_envs() if get_task(env_id).solve is not None]
    policy_name = args.model or "oracle"
    rows = []
    for env_id in tasks:
        if env_id in list_envs() and env_id not in list_task_envs():
            print(f"llm-gym eval: {env_id} is not a single-turn task env; evaluate a multi-turn game with its "
                  "module's evaluate_player (llm_gym.tasks.tictactoe.evaluate_player)", file=sys.stderr)
            return 2
        kwargs: dict[str, Any] = {"split": args.split, "size": args.num_problems, "seed": args.seed}
        if args.dataset:
            kwargs["dataset"] = args.dataset
            kwargs["size"] = None
        if args.model:
            policy, tokenizer = _model_policy(args.model, args.max_new_tokens)
            kwargs["tokenizer"] = tokenizer
        env = gym.make(env_id, **kwargs).unwrapped
        assert isinstance(env, ReasoningEnv)
        if not args.model:
            policy = _oracle_policy(env)
        metrics = evaluate_policy(env, policy, args.num_problems)
        parts = {k.removeprefix("reward/"): v for k, v in metrics.items() if k.startswith("reward/") and k != "reward/total"}
        for name, value in parts.items():
            rows.append((env_id, policy_name, args.split, name, value))
        rows.append((env_id, policy_name, args.split, "total", metrics["reward/total"]))
        rows.append((env_id, policy_name, args.split, "exact accuracy", metrics["accuracy"]))
        logger.info("%s: %s", env_id, metrics)
    print(format_table(rows, ["env", "policy", "split", "reward part", "mean"]))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from llm_gym.algorithms.recipe import held_out_table, load_config, run_training

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
