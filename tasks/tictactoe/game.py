"""The rules of Tic-Tac-Toe, the seeded minimax opponent, the answer format and the scripted players.

Boards are 9-character strings, row-major from the top left, of ``X``, ``O`` and ``.`` (free);
cells are numbered 1-9. X always moves first. Everything here is a pure function of its
arguments except :class:`Player`, which owns a seeded generator for its tie-breaks and noise.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "EMPTY", "Player", "best_moves", "free_cells", "is_formatted", "model_starts", "move_tag", "move_text",
    "opponent_move", "other", "parse_move", "place", "render_board", "winner",
]

EMPTY = "."
_LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))
_START_SALT = 3**9  # above every board code: the "who starts" draw has a stream of its own
_MOVE_ONLY = re.compile(r"<move>\s*[0-9]{1,6}\s*</move>")
_NUMBER = re.compile(r"[0-9]{1,6}")  # 6 digits: int() of a huge literal is slow and capped
_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def other(mark: str) -> str:
    """The opposite mark."""
    return "O" if mark == "X" else "X"


def winner(board: str) -> str | None:
    """``"X"`` or ``"O"`` when that mark has three in a row, else ``None``."""
    for a, b, c in _LINES:
        if board[a] != EMPTY and board[a] == board[b] == board[c]:
            return board[a]
    return None


def free_cells(board: str) -> list[int]:
    """The free cells, numbered 1-9."""
    return [i + 1 for i, c in enumerate(board) if c == EMPTY]


def place(board: str, cell: int, mark: str) -> str:
    """The board with ``mark`` on ``cell`` (1-9)."""
    return board[: cell - 1] + mark + board[cell:]


def render_board(board: str) -> str:
    """The board as three rows, free cells shown by their number (``"X | 2 | 3\\n---------\\n..."``)."""
    cells = [str(i + 1) if c == EMPTY else c for i, c in enumerate(board)]
    rows = [" | ".join(cells[r : r + 3]) for r in (0, 3, 6)]
    return "\n---------\n".join(rows)


@functools.cache
def _minimax(board: str, to_move: str) -> tuple[int, tuple[int, ...]]:
    """(value for the player to move, its best cells). A win is worth 1 + the cells left empty."""
    empty = board.count(EMPTY)
    if winner(board) is not None:  # the previous mover has won
        return -(1 + empty), ()
    if empty == 0:
        return 0, ()
    scores = {cell: -_minimax(place(board, cell, to_move), other(to_move))[0] for cell in free_cells(board)}
    best = max(scores.values())
    return best, tuple(cell for cell, score in scores.items() if score == best)


def _check_board(board: str, mark: str) -> None:
    if len(board) != 9 or set(board) - {"X", "O", EMPTY} or mark not in ("X", "O"):
        raise ValueError(f"board must be 9 characters of X, O and {EMPTY!r}, mark X or O; got {board!r}, {mark!r}")
    if winner(board) is not None or EMPTY not in board:
        raise ValueError(f"the game on board {board!r} is over: there is no move to make")


def best_moves(board: str, mark: str) -> tuple[int, ...]:
    """Every optimal cell (1-9) for ``mark`` to play: the quickest win, else a draw, else the latest loss.

    Raises:
        ValueError: for a malformed board or a finished game.
    """
    _check_board(board, mark)
    return _minimax(board, mark)[1]


def _board_code(board: str) -> int:
    return int(board.replace(EMPTY, "0").replace("X", "1").replace("O", "2"), 3)


def opponent_move(board: str, mark: str, *, episode_seed: int, random_move_prob: float) -> int:
    """The opponent's reply: a function of (episode seed, board) and its strength only.

    With probability ``random_move_prob`` a uniformly random free cell, else a random one of
    :func:`best_moves`; the draws come from a generator seeded by ``(episode_seed, board)``.

    Args:
        board: The board before the reply.
        mark: The opponent's mark.
        episode_seed: The game's seed.
        random_move_prob: Chance of a random legal move (0 = optimal).

    Returns:
        The cell, 1-9.
    """
    rng = np.random.default_rng([episode_seed, _board_code(board)])
    if rng.random() < random_move_prob:
        return int(rng.choice(free_cells(board)))
    return int(rng.choice(best_moves(board, mark)))


def model_starts(episode_seed: int) -> bool:
    """Whether the model moves first (plays X) in the game of ``episode_seed``: a fair coin drawn from the seed."""
    return bool(np.random.default_rng([episode_seed, _START_SALT]).random() < 0.5)


# ---------------------------------------------------------------------------------- answer format
def move_tag(completion: str) -> str | None:
    """The stripped content of the last ``<move>...</move>`` (found in linear time), or ``None``."""
    end = completion.rfind("</move>")
    start = completion.rfind("<move>", 0, max(end, 0))
    return None if end < 0 or start < 0 else completion[start + len("<move>") : end].strip()


def parse_move(completion: str) -> int | None:
    """The integer in the last ``<move>...</move>`` (range not checked), or ``None``.

    >>> parse_move("<think>Take the centre.</think><move>5</move>")
    5
    >>> parse_move("<move>five</move>") is None
    True
    """
    content = move_tag(completion)
    return int(content) if content is not None and _NUMBER.fullmatch(content) else None


def is_formatted(turn: str) -> bool:
    """Whether one assistant turn is exactly ``<think>...</think><move>digits</move>`` (outer whitespace allowed).

    >>> is_formatted("<think>I block 7.</think>\\n<move>7</move>")
    True
    >>> is_formatted("<move>7</move>")
    False
    """
    text = turn.strip()
    end = text.find("</think>")
    if not text.startswith("<think>") or end < 0:
        return False
    reasoning = text[len("<think>") : end]
    if "<think>" in reasoning or "<move>" in reasoning:
        return False
    return _MOVE_ONLY.fullmatch(text[end + len("</think>") :].strip()) is not None




# ----------------------------------------------------------------------------- scripted players
def _reason(board: str, mark: str, cell: int, best: bool) -> str:
    """A short, true reason for playing ``cell``."""
    if winner(place(board, cell, mark)) == mark:
        return f"{cell} completes a line of mine."
    if winner(place(board, cell, other(mark))) == other(mark):
        return f"{other(mark)} would complete a line at {cell}, so I block it."
    if not best:
        return f"I take {cell}."
    value = _minimax(board, mark)[0]
    plan = "I can force a win" if value > 0 else "best play draws" if value == 0 else "I cannot avoid a loss"
    return f"No line to complete or block; {plan}, and {cell} keeps that."


def move_text(reason: str, cell: int | str) -> str:
    """One assistant turn in the answer format: ``<think>reason</think><move>cell</move>``."""
    return f"<think>{reason}</think><move>{cell}</move>"


class Player:
    """A scripted text policy: the minimax oracle, or with noise an imperfect teacher.

    Its completions are in the answer format with a short true reason (complete a line, block
    one, or the value of the position). The teacher's noise is of two kinds: a random legal move
    instead of a best one (a weaker player), and a malformed turn (no ``<think>`` block, no
    ``<move>`` tag, or the cell in words), which the SFT filter (format 1) removes.

    Args:
        random_move_prob: Chance of a random legal move instead of a best one.
        malformed_prob: Chance of a malformed turn.
        seed: Seed of its own choices: ties among best moves and the noise.

    Raises:
        ValueError: if a probability is outside [0, 1].
    """

    def __init__(self, random_move_prob: float = 0.0, malformed_prob: float = 0.0, seed: int = 0) -> None:
        for name, p in (("random_move_prob", random_move_prob), ("malformed_prob", malformed_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p!r}")
        self.random_move_prob = random_move_prob
        self.malformed_prob = malformed_prob
        self.rng = np.random.default_rng(seed)

    @classmethod
    def teacher(cls, seed: int = 0, random_move_prob: float = 0.2, malformed_prob: float = 0.05) -> Player:
        """The default imperfect teacher for SFT data: a random move 20 % and a malformed turn 5 % of the time."""
        return cls(random_move_prob=random_move_prob, malformed_prob=malformed_prob, seed=seed)

    def move(self, board: str, mark: str) -> tuple[int, bool]:
        """The cell to play and whether it is a best move."""
        if self.random_move_prob and self.rng.random() < self.random_move_prob:
            cell = int(self.rng.choice(free_cells(board)))
            return cell, cell in best_moves(board, mark)
        return int(self.rng.choice(best_moves(board, mark))), True

    def completion(self, board: str, mark: str) -> str:
        """One assistant turn for ``mark`` on ``board``."""
        cell, best = self.move(board, mark)
        reason = _reason(board, mark, cell, best)
        if self.malformed_prob and self.rng.random() < self.malformed_prob:
            kind = int(self.rng.integers(3))
            return (f"<move>{cell}</move>", f"<think>{reason}</think> I play {cell}.",
                    move_text(reason, _WORDS[cell - 1]))[kind]
        return move_text(reason, cell)

    def __call__(self, observations: Sequence[dict[str, Any]], infos: Sequence[dict[str, Any]]) -> list[str]:
        """A :data:`~llm_gym.episodes.TextPolicy`: reads each game's ``info["board"]`` and ``info["mark"]``."""
        return [self.completion(info["board"], info["mark"]) for info in infos]
