"""TicTacToe probe: does an SFT model read the board? Teacher-forced, per turn, on held-out teacher games.

Game results (``benchmarks.tictactoe``) mix two failures: a model that picks a bad or occupied
cell, and greedy decoding that repeats an invalid move until the turn cap. This probe looks at one
decision at a time. On kept teacher games it has not trained on (another seed), it runs the model
teacher-forced over each whole conversation and, at every assistant turn's move digit (the token
inside ``<move>N</move>``), reports:

* ``move_nll``: the loss of the teacher's move digit (nats; ln 9 = 2.2 is a uniform guess over
  the cells; the teacher's own ties and 20 % random moves put the floor above 0);
* ``valid``: the share of turns where the model's top digit is a free cell;
* ``best``: the share where it is one of the oracle's best moves (:func:`best_moves`);
* ``copy``: the share where it equals the cell the turn's ``<think>`` already named (when it names
  one: the move is then a copy of a token a few places back);
* ``think_nll``, ``think_valid``, ``think_best``: the same three at the digit where the
  ``<think>`` names the cell (teacher-forced on the reason's words before it), the real decision
  when the move only copies it.

Run from the repository root (``MODEL`` a saved SFT model, e.g. a ``ttt-sft-*`` cache folder)::

    .venv/bin/python -m benchmarks.tictactoe_probe MODEL [--preset tiny] [--games 200]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger("benchmarks.tictactoe_probe")

_GRID_ROW = re.compile(r"^(\S) \| (\S) \| (\S)$", re.MULTILINE)


def board_of(user_text: str) -> str:
    """The board (9 characters ``X``/``O``/``.``) of the last grid drawn in a user message.

    >>> board_of("Your opponent (O) played 5.\\n\\nX | 2 | 3\\n---------\\n4 | O | 6\\n---------\\n7 | 8 | 9")
    'X...O....'
    """
    rows = _GRID_ROW.findall(user_text)[-3:]
    if len(rows) != 3:
        raise ValueError(f"no 3-row board in {user_text[:80]!r}")
    return "".join(c if c in "XO" else "." for row in rows for c in row)


def turn_decisions(messages: Sequence[dict[str, str]]) -> list[tuple[str, str, int, int | None]]:
    """Each assistant turn of a game: (board before it, the model's mark, the teacher's move, the cell its think names).

    The mark is ``X`` when the board before the turn has as many X as O (X moves first).
    """
    from llm_gym.tasks.tictactoe import parse_move

    out, board = [], None
    for m in messages:
        if m["role"] == "user":
            board = board_of(m["content"])
        elif m["role"] == "assistant" and board is not None:
            mark = "X" if board.count("X") == board.count("O") else "O"
            think = m["content"].split("</think>")[0]
            named = [int(d) for d in re.findall(r"(?<![0-9])[1-9](?![0-9])", think)]
            out.append((board, mark, parse_move(m["content"]), named[-1] if named else None))
    return out


def probe(model: Any, tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]]) -> dict[str, float]:
    """The probe's four numbers over every assistant turn of ``conversations`` (see the module docstring)."""
    from llm_gym.multi_turn import conversation_ids
    from llm_gym.tasks.tictactoe import best_moves, free_cells

    digit_ids = {tokenizer.convert_tokens_to_ids(str(d)): d for d in range(1, 10)}
    nll, valid, best, copy, named = [], [], [], [], 0
    think: list[tuple[float, bool, bool]] = []

    def top_digit(logits_row: torch.Tensor) -> int:
        return list(digit_ids.values())[int(logits_row[list(digit_ids)].argmax())]

    model.eval()
    for messages in conversations:
        ids, labels = conversation_ids(messages, tokenizer)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # [L, V]
        # an assistant turn ends ... <move> N </ move > EOS: its move digit is 4 tokens before each EOS
        ends = [t for t, lab in enumerate(labels) if lab == tokenizer.eos_token_id]
        starts = [t for t in range(1, len(labels)) if labels[t] != -100 and labels[t - 1] == -100]
        decisions = turn_decisions(messages)
        for start, end, (board, mark, move, think_cell) in zip(starts, ends, decisions, strict=True):
            t = end - 4
            if digit_ids.get(ids[t]) != move:
                raise ValueError(f"token {t} is not the move digit {move}: {tokenizer.decode(ids[t - 3 : t + 2])!r}")
            nll.append(-float(logp[t - 1, ids[t]]))
            top = top_digit(logp[t - 1])
            valid.append(top in free_cells(board))
            best.append(top in best_moves(board, mark))
            if think_cell is not None:
                named += 1
                copy.append(top == think_cell)
                close = next(u for u in range(start, end) if "</" in tokenizer.decode(ids[u]))  # ends the think
                u = max(u for u in range(start, close) if digit_ids.get(ids[u]) == think_cell)
                pick = top_digit(logp[u - 1])
                think.append((-float(logp[u - 1, ids[u]]), pick in free_cells(board), pick in best_moves(board, mark)))
    n = len(nll)
    result = {"turns": n, "move_nll": sum(nll) / n, "valid": sum(valid) / n, "best": sum(best) / n,
              "copy": sum(copy) / named if named else float("nan")}  # fmt: skip
    for i, name in enumerate(("think_nll", "think_valid", "think_best")):
        result[name] = sum(float(v[i]) for v in think) / len(think) if think else float("nan")
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Command line: ``MODEL [--preset P] [--games N] [--seed S]``; prints the numbers as JSON."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_gym.tasks.tictactoe import teacher_conversations
    from llm_gym.tiny import tiny_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--games", type=int, default=200, help="teacher games played (the kept ones are probed)")
    parser.add_argument("--seed", type=int, default=99, help="seed of the probe's games (SFT data uses 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path(args.preset, seed=0, env_ids=["llm_gym/TicTacToe-v0"]))
    model = AutoModelForCausalLM.from_pretrained(args.model)
    result = probe(model, tokenizer, teacher_conversations(args.games, seed=args.seed))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
