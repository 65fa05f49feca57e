"""``llm-gym data``: filter saved rollouts (``filter``) and measure their token lengths (``lengths``).

::

    llm-gym data filter rollouts/ --where "correct and format == 1" --out sft_data/
    llm-gym data lengths sft_data/ --tokenizer Qwen/Qwen2.5-0.5B-Instruct --seq-len 512

The filter is a safe expression over the dataset's columns (:mod:`llm_gym.row_filter`); the
lengths are of whole conversations with the model's chat template applied, as SFT trains on them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from llm_gym.console import emit, fail

__all__ = ["add_data_parser"]


def _fail(message: str) -> int:
    return fail("data", message)


def _cmd_filter(args: argparse.Namespace) -> int:
    from llm_gym.rollout_dataset import load_rollouts
    from llm_gym.row_filter import FilterError, compile_filter

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return _fail(f"--out {args.out} exists and is not empty: choose another folder")
    try:
        data = load_rollouts(args.dir)
        keep = compile_filter(args.where, data.column_names)
    except (ValueError, FilterError) as err:
        return _fail(str(err))
    try:
        kept = [i for i, row in enumerate(data) if keep(row)]
    except TypeError as err:  # e.g. a string column compared with a number
        return _fail(f"--where {args.where!r} cannot compare these columns ({err}); compare like with like")
    data.select(kept).save_to_disk(str(out))
    emit(f"kept {len(kept)} of {len(data)} rows ({100 * len(kept) / max(len(data), 1):.1f}%) -> {out}")
    return 0


def _cmd_lengths(args: argparse.Namespace) -> int:
    from llm_gym.rollout_dataset import load_rollouts

    if args.seq_len < 1:
        return _fail(f"--seq-len {args.seq_len}: give a positive number of tokens")
    try:
        data = load_rollouts(args.dir)
    except ValueError as err:
        return _fail(str(err))
    from transformers import AutoTokenizer

    from llm_gym.algorithms.sft import dataset_examples, length_report

    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(args.tokenizer)
    except OSError as err:
        return _fail(f"--tokenizer {args.tokenizer}: cannot load it ({str(err).splitlines()[0]}); pass a local "
                     "folder or hub id of a tokenizer with a chat template")  # fmt: skip
    try:
        # one example per row: a multi-turn row's last turn example holds its whole conversation
        report = length_report([dataset_examples([row], tokenizer)[-1] for row in data], tokenizer, args.seq_len)
    except ValueError as err:
        return _fail(str(err))
    emit(f"{report.count} conversations: longest {report.max_length} tokens, mean {report.mean_length:.1f}; "
         f"{report.fit} ({100 * report.fit_fraction:.2f}%) fit within {report.seq_len} tokens")  # fmt: skip
    return 0


def add_data_parser(sub: Any) -> None:
    """Add ``data filter`` and ``data lengths`` to the ``llm-gym`` subcommands."""
    p_data = sub.add_parser("data", help="filter saved rollouts and measure their token lengths")
    data_sub = p_data.add_subparsers(dest="data_command", required=True)
    p_filter = data_sub.add_parser("filter", help="keep the rows where an expression holds")
    p_filter.add_argument("dir", help="a dataset folder (llm-gym eval --save-dataset)")
    p_filter.add_argument("--where", required=True,
                          help='e.g. "correct and format == 1" (columns, constants, comparisons, and/or/not)')
    p_filter.add_argument("--out", required=True, help="folder of the filtered dataset")
    p_filter.set_defaults(func=_cmd_filter)
    p_lengths = data_sub.add_parser("lengths", help="token lengths of the conversations, chat template applied")
    p_lengths.add_argument("dir", help="a dataset folder (llm-gym eval --save-dataset or data filter)")
    p_lengths.add_argument("--tokenizer", required=True, help="local folder or hub id of the model's tokenizer")
    p_lengths.add_argument("--seq-len", type=int, required=True, help="the SFT sequence length considered")
    p_lengths.set_defaults(func=_cmd_lengths)
