"""``llm-gym sft --dataset DIR``: the SFT warm-up on a saved dataset of chat rollouts, as a command.

::

    llm-gym eval --task llm_gym/Countdown-v0 --base-url URL --model gpt-5-mini -n 200 --split train --save-dataset all
    llm-gym data filter all --where "correct and format == 1" --out good
    llm-gym sft --dataset good --model Qwen/Qwen2.5-0.5B-Instruct --output-dir warm --steps 300 --seq-len 512

It trains every parameter of ``--model`` (default: the embedded tiny model) on the completions of
the rows (:func:`llm_gym.algorithms.sft.dataset_examples`) and saves the model and tokenizer in
``--output-dir``, ready for ``llm-gym train --model``. In a train config the same data goes in
``sft_dataset:``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from llm_gym.console import emit, fail

__all__ = ["add_sft_parser"]


def _fail(message: str) -> int:
    return fail("sft", message)


def _cmd_sft(args: argparse.Namespace) -> int:
    from llm_gym.rollout_dataset import load_rollouts

    out = Path(args.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return _fail(f"--output-dir {args.output_dir} exists and is not empty: choose another folder")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            return _fail(f"{flag} {value}: give a positive number")
    if not args.lr > 0:
        return _fail(f"--lr {args.lr}: give a positive learning rate")
    try:
        data = load_rollouts(args.dataset)
    except ValueError as err:
        return _fail(str(err))
    if len(data) == 0:
        return _fail(f"{args.dataset} has no rows: loosen the data filter")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_gym.algorithms.sft import SFTConfig, dataset_examples, length_report, train_sft
    from llm_gym.tiny import tiny_model_path

    source = args.model or str(tiny_model_path("tiny"))
    tokenizer: Any = AutoTokenizer.from_pretrained(source)
    try:
        examples = dataset_examples(data, tokenizer)
    except ValueError as err:
        return _fail(str(err))
    report = length_report(examples, tokenizer, args.seq_len)
    model = AutoModelForCausalLM.from_pretrained(source)
    config = SFTConfig(max_steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                       seed=args.seed, progress=True)  # fmt: skip
    result = train_sft(model, tokenizer, examples, config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    emit(f"{len(examples)} examples ({100 * report.fit_fraction:.1f}% within {args.seq_len} tokens), {result.steps} "
         f"steps: loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; model: {out}")  # fmt: skip
    return 0


def add_sft_parser(sub: Any) -> None:
    """Add ``sft`` to the ``llm-gym`` subcommands."""
    p = sub.add_parser("sft", help="SFT warm-up on a saved dataset of rollouts (llm-gym eval --save-dataset)")
    p.add_argument("--dataset", required=True, help="dataset folder (llm-gym eval --save-dataset / data filter)")
    p.add_argument("--model", help="local path or hub id of a causal LM (default: the embedded tiny model)")
    p.add_argument("--output-dir", required=True, help="where the trained model and tokenizer are saved")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (1e-5..1e-4 for a pretrained model)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512, help="longer sequences are truncated (see data lengths)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_sft)
