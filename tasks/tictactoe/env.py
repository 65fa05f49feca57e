"""TicTacToe: a game of several turns against a seeded minimax opponent (``llm_gym/TicTacToe-v0``).

## Description
The seed course's multi-turn game (shared/seeds/000, 003). Each episode is one game of
Tic-Tac-Toe between the model and a scripted opponent. ``reset`` shows the empty board (or the
opponent's first move: who starts is drawn from the episode's seed, the opponent about half the
time); every ``step`` takes the model's turn, plays the opponent's reply and shows the new board.
X always moves first, so the model plays X when it starts and O otherwise.

The opponent is minimax that breaks ties **at random among equally good moves** (preferring
quicker wins and later losses), and plays a uniformly random legal move instead with probability
``random_move_prob`` (0 = optimal, 1 = random). A deterministic tie-break gets memorised (the
course's post-mortem). The reply depends only on (episode seed, board): every rollout of a group
that reaches the same board faces the same reply, and the same seed with the same moves replays
exactly.

Games come in splits like a task's problems: game ``i`` of a split has an episode seed drawn from
``(seed, split, i)``, kept only when a hash of it falls in that split (20 % test), so held-out
games never share a seed with training games.

## Observation
A dict: ``messages``, the conversation so far as a tuple of ``{"role", "content"}`` dicts (a
system message with the rules, then alternating user and assistant turns), and ``prompt``, the
conversation rendered by the tokenizer's chat template with the generation prompt (none once the
game is over), present only when a ``tokenizer`` is given. Each user message shows the board
with its free cells numbered (cells 1-9 row by row from the top left) and lists the free cells::

    Your opponent (O) played 5.

    X | 2 | 3
    ---------
    4 | O | 6
    ---------
    7 | 8 | 9

    Free cells: 2, 3, 4, 6, 7, 8, 9. Your move.

## Action
The assistant turn's text (a ``gymnasium.spaces.Text``), in the answer format
``<think>reasoning</think><move>N</move>``; the move is the integer in the last
``<move>...</move>``. An unparsable move, a number outside 1-9 or an occupied cell is an
*invalid move*: the board is unchanged, the next message says what was wrong and the model tries
again (the episode goes on); it is counted in ``info["invalid_moves"]``.

## Rewards
Every step before the last rewards 0.0; the last step rewards the weighted rubric total
(default weights 1.0, 0.2 and -0.1; total in [-0.1, 1.2]), each part in ``info["rewards"]``:

* ``outcome``: 1.0 win, 0.5 draw, 0.0 loss (hitting the turn cap is a loss).
* ``format``: the share of the model's turns that are exactly
  ``<think>...</think><move>digits</move>`` (whitespace around the tags allowed; no ``<think>``
  or ``<move>`` inside the reasoning).
* ``invalid_move``: 1.0 if any move of the game was invalid (weight -0.1: a penalty paid once).

The parts run under the rubric's time limit like every task's rewards.

## Info
``board`` (9 characters ``X``, ``O`` or ``.``, row-major, after the opponent's reply), ``mark``
(the model's mark), ``invalid_moves`` (count so far); once the game is over also ``outcome``
(``"win"``, ``"draw"``, ``"loss"``), ``rewards`` (per part) and ``reward_errors``.

## Episode End
Terminates on a win, a draw or a loss. Truncates (``truncated=True``, scored as a loss) when the
model has taken ``max_turns`` turns, invalid ones included, and the game is not over.

## Arguments
``split`` (``"train"``/``"test"``), ``size`` (games in the split, 1000), ``seed`` (seed of the
split's games), ``tokenizer``, ``render_mode`` (``"ansi"``: the board as text),
``max_completion_chars`` (size of the action space), and the fields of :class:`TicTacToeConfig`:
``random_move_prob`` (a probability, or a ``[low, high]`` range from which each game draws its
own; default ``[0, 1]``), ``max_turns`` (8), ``outcome_weight``, ``format_weight``,
``invalid_move_weight``. ``reset(options={"index": i, "random_move_prob": p})`` picks game ``i``
and pins the opponent's strength. ``forfeit()`` ends a running game as a loss (a trainer that
stops an episode at its context length).

## Version History
* v0: initial version.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from llm_gym.episodes import EpisodeBatch, play
from llm_gym.problems import SPLITS, split_of
from llm_gym.rubric import Rubric
from llm_gym.spaces import messages_space, text_space
from llm_gym.tasks.tictactoe.game import (
    EMPTY,
    Player,
    free_cells,
    is_formatted,
    model_starts,
    move_tag,
    opponent_move,
    other,
    parse_move,
    place,
    render_board,
    winner,
)

__all__ = [
    "ENV_ID", "OUTCOME_REWARDS", "SYSTEM_PROMPT", "TEST_FRACTION", "TicTacToeConfig", "TicTacToeEnv",
    "format_reward", "invalid_move_reward", "make_rubric", "outcome_reward",
]

ENV_ID = "llm_gym/TicTacToe-v0"
TEST_FRACTION = 0.2
"""Share of the episode seeds held out as the test split."""
OUTCOME_REWARDS = MappingProxyType({"win": 1.0, "draw": 0.5, "loss": 0.0})
"""Value of the ``outcome`` part for each outcome."""

SYSTEM_PROMPT = (
    "You are playing Tic-Tac-Toe. The cells are numbered 1 to 9, row by row from the top left. X moves first. "
    "Three of your marks in a row, column or diagonal win; a full board without one is a draw.\n"
    "On your turn, think briefly inside <think>...</think>, then give one free cell inside <move>...</move>, "
    "for example <think>The centre is free.</think><move>5</move>"
)


def outcome_reward(completion: str, *, outcome: str, **_: Any) -> float:
    """1.0 for a win, 0.5 for a draw, 0.0 for a loss.

    >>> outcome_reward("", outcome="draw")
    0.5
    """
    return OUTCOME_REWARDS[outcome]


def format_reward(completion: str, *, turns: Sequence[str], **_: Any) -> float:
    """The share of the model's turns in the answer format (:func:`is_formatted`).

    >>> format_reward("", turns=["<think>a</think><move>1</move>", "<move>2</move>"])
    0.5
    """
    return sum(map(is_formatted, turns)) / len(turns) if turns else 0.0


def invalid_move_reward(completion: str, *, invalid_moves: int, **_: Any) -> float:
    """1.0 if any move of the game was invalid (weighted negatively: a penalty paid once).

    >>> invalid_move_reward("", invalid_moves=3)
    1.0
    """
    return 1.0 if invalid_moves > 0 else 0.0


@dataclass(frozen=True)
class TicTacToeConfig:
    """Knobs of the game (env kwargs)."""

    random_move_prob: float | tuple[float, float] = (0.0, 1.0)
    """The opponent's chance of a random legal move, or a ``(low, high)`` range each game draws its own from."""
    max_turns: int = 8
    """Most model turns (invalid ones included) before the game is stopped and scored as a loss."""
    outcome_weight: float = 1.0
    """Weight of the ``outcome`` part (1 win / 0.5 draw / 0 loss)."""
    format_weight: float = 0.2
    """Weight of the ``format`` part (share of well-formatted turns)."""
    invalid_move_weight: float = -0.1
    """Weight of the ``invalid_move`` part (1 when any move was invalid)."""

    def __post_init__(self) -> None:
        p = self.random_move_prob
        pair = (p, p) if isinstance(p, (int, float)) else tuple(p) if isinstance(p, Sequence) else ()
        if len(pair) != 2 or not all(isinstance(v, (int, float)) for v in pair) or not 0 <= pair[0] <= pair[1] <= 1:
            raise ValueError(
                f"random_move_prob must be a probability or a [low, high] range with 0 <= low <= high <= 1, got {p!r}"
            )
        object.__setattr__(
            self, "random_move_prob", float(p) if isinstance(p, (int, float)) else (float(pair[0]), float(pair[1]))
        )
        if not (isinstance(self.max_turns, int) and self.max_turns >= 1):
            raise ValueError(f"max_turns must be a positive integer, got {self.max_turns!r}")

    @property
    def strength_range(self) -> tuple[float, float]:
        """``random_move_prob`` as a ``(low, high)`` range."""
        p = self.random_move_prob
        return (p, p) if isinstance(p, float) else p


def make_rubric(config: TicTacToeConfig) -> Rubric:
    """The game's rubric: ``outcome``, ``format`` and ``invalid_move`` with the config's weights."""
    return Rubric(
        [outcome_reward, format_reward, invalid_move_reward],
        [config.outcome_weight, config.format_weight, config.invalid_move_weight],
        names=["outcome", "format", "invalid_move"],
    )


def _config(knobs: Mapping[str, Any]) -> TicTacToeConfig:
    valid = sorted(f.name for f in dataclasses.fields(TicTacToeConfig))
    unknown = sorted(set(knobs) - set(valid))
    if unknown:
        raise TypeError(
            f"{ENV_ID} got unknown argument {unknown[0]!r}; its knobs are {valid}, "
            "plus split, size, seed, tokenizer, render_mode, max_completion_chars"
        )
    return TicTacToeConfig(**knobs)


def _user(status: str, board: str, *, over: bool) -> dict[str, str]:
    body = f"{status}\n\n{render_board(board)}"
    if not over:
        body += f"\n\nFree cells: {', '.join(map(str, free_cells(board)))}. Your move."
    return {"role": "user", "content": body}


# ------------------------------------------------------------------------------------- the env
class TicTacToeEnv(gym.Env):
    """One game of Tic-Tac-Toe against a seeded minimax opponent; the module docstring is its card."""

    metadata = {"render_modes": ["ansi"], "render_fps": 1}  # render_fps: Gymnasium warns when it is missing
    description = "Play Tic-Tac-Toe over several turns against a seeded minimax opponent."

    def __init__(
        self,
        *,
        split: str = "train",
        size: int = 1000,
        seed: int = 0,
        tokenizer: Any = None,
        render_mode: str | None = None,
        max_completion_chars: int = 16_384,
        **knobs: Any,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not (isinstance(size, int) and size > 0):
            raise ValueError(f"size (games in the split) must be a positive integer, got {size!r}")
        self.config = _config(knobs)
        self.rubric = make_rubric(self.config)
        self.split, self.size, self.seed = split, size, seed
        self.tokenizer = tokenizer
        self.render_mode = render_mode
        obs = {"messages": messages_space(max(max_completion_chars, 4096))}
        if tokenizer is not None:
            obs["prompt"] = text_space(self.config.max_turns * (max_completion_chars + 1024) + 4096)
        self.observation_space = spaces.Dict(obs)
        self.action_space = text_space(max_completion_chars)
        self.episode_seed = 0
        self.random_move_prob = 0.0
        self.mark = "X"
        self._board = EMPTY * 9
        self._messages: list[dict[str, str]] = []
        self._turns: list[str] = []
        self._invalid = 0
        self._result: tuple[str, dict[str, float], dict[str, str]] | None = None  # outcome, parts, errors

    def game(self, index: int) -> tuple[int, float]:
        """Game ``index`` of the split: its episode seed and opponent strength (``random_move_prob``)."""
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index % self.size])
        episode_seed = int(rng.integers(2**32))
        while split_of(f"TicTacToe:{episode_seed}", TEST_FRACTION) != self.split:
            episode_seed = int(rng.integers(2**32))
        low, high = self.config.strength_range
        return episode_seed, low if low == high else float(rng.uniform(low, high))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Start a game (``options``: ``index`` picks game ``i`` of the split, ``random_move_prob`` pins the opponent).

        Raises:
            ValueError: for an unknown option or a strength outside [0, 1].
        """
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = sorted(set(options) - {"index", "random_move_prob"})
        if unknown:
            raise ValueError(f"unknown reset option {unknown[0]!r}; options: index, random_move_prob")
        index = int(options["index"]) if "index" in options else int(self.np_random.integers(self.size))
        self.episode_seed, self.random_move_prob = self.game(index)
        if "random_move_prob" in options:
            self.random_move_prob = float(options["random_move_prob"])
            if not 0.0 <= self.random_move_prob <= 1.0:
                raise ValueError(f"random_move_prob must be in [0, 1], got {options['random_move_prob']!r}")
        self._board, self._turns, self._invalid, self._result = EMPTY * 9, [], 0, None
        if model_starts(self.episode_seed):
            self.mark, status = "X", "New game. You play X and move first."
        else:
            self.mark = "O"
            cell = self._reply()
            status = f"New game. You play O. Your opponent (X) played {cell}."
        self._messages = [{"role": "system", "content": SYSTEM_PROMPT}, _user(status, self._board, over=False)]
        return self._observe(), self._info()

    def _reply(self) -> int:
        """Play the opponent's move on the board; return its cell."""
        cell = opponent_move(
            self._board, other(self.mark), episode_seed=self.episode_seed, random_move_prob=self.random_move_prob
        )
        self._board = place(self._board, cell, other(self.mark))
        return cell

    def _invalid_reason(self, completion: str) -> tuple[int, str | None]:
        tag = move_tag(completion)
        cell = parse_move(completion)
        if tag is None:
            return 0, "no <move>N</move> found"
        if cell is None:
            return 0, f"{tag[:20]!r} is not a cell number"
        if not 1 <= cell <= 9:
            return cell, f"{cell} is not a cell (1-9)"
        if self._board[cell - 1] != EMPTY:
            return cell, f"cell {cell} is taken"
        return cell, None

    def _play(self, completion: str) -> tuple[str, str | None]:
        """Apply one model turn (and the reply): the status text and the outcome, if the game is over."""
        cell, reason = self._invalid_reason(completion)
        if reason is not None:
            self._invalid += 1
            return f"Invalid move: {reason}. Try again.", None
        self._board = place(self._board, cell, self.mark)
        if winner(self._board) == self.mark:
            return "You win!", "win"
        if EMPTY not in self._board:
            return "It's a draw.", "draw"
        status = f"Your opponent ({other(self.mark)}) played {self._reply()}."
        if winner(self._board) is not None:
            return f"{status} You lose.", "loss"
        if EMPTY not in self._board:
            return f"{status} It's a draw.", "draw"
        return status, None

    def step(self, action: str) -> tuple[dict, float, bool, bool, dict]:
        """Play the model's turn and the opponent's reply.

        Raises:
            RuntimeError: before ``reset`` or after the game is over.
            TypeError: if the action is not a string.
        """
        if not self._messages:
            raise RuntimeError("call reset() before step()")
        if self._result is not None:
            raise RuntimeError("the game is over: call reset() to start another")
        if not isinstance(action, str):
            raise TypeError(f"the action is the completion text (str), got {type(action).__name__}")
        self._turns.append(action)
        self._messages.append({"role": "assistant", "content": action})
        status, outcome = self._play(action)
        truncated = outcome is None and len(self._turns) >= self.config.max_turns
        if truncated:
            status, outcome = f"{status} Turn limit of {self.config.max_turns} reached: you lose.", "loss"
        self._messages.append(_user(status, self._board, over=outcome is not None))
        reward = 0.0 if outcome is None else self._score(outcome)
        return self._observe(), reward, outcome is not None and not truncated, truncated, self._info()

    def _score(self, outcome: str) -> float:
        """End the game with ``outcome``: score it with the rubric and keep the result."""
        columns = {"outcome": outcome, "turns": tuple(self._turns), "invalid_moves": self._invalid,
                   "board": self._board, "mark": self.mark}  # fmt: skip
        score = self.rubric.score(self._turns[-1] if self._turns else "", columns)
        self._result = (outcome, dict(score.parts), dict(score.errors))
        return float(score.total)

    def forfeit(self) -> tuple[float, dict[str, Any]]:
        """End a running game now, scored as a loss like the turn cap (a trainer that stops an
        episode early, e.g. at its context length, calls this).

        Returns:
            ``(reward, info)``: the final step's reward and the info with ``outcome`` and ``rewards``.

        Raises:
            RuntimeError: before ``reset`` or after the game is over.
        """
        if not self._messages or self._result is not None:
            raise RuntimeError("forfeit() ends a running game: call reset() first")
        return self._score("loss"), self._info()

    def _observe(self) -> dict[str, Any]:
        obs: dict[str, Any] = {"messages": tuple(dict(m) for m in self._messages)}
        if self.tokenizer is not None:
            obs["prompt"] = self.tokenizer.apply_chat_template(
                list(obs["messages"]), tokenize=False, add_generation_prompt=self._result is None
            )
        return obs

    def _info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"board": self._board, "mark": self.mark, "invalid_moves": self._invalid}
        if self._result is not None:
            outcome, parts, errors = self._result
            info.update(outcome=outcome, rewards=dict(parts), reward_errors=dict(errors))
        return info

    def render(self) -> str | None:
        """The board and the game's state as text (``render_mode="ansi"``)."""
        if self.render_mode != "ansi" or not self._messages:
            return None
        state = f"outcome: {self._result[0]}" if self._result is not None else "in play"
        return f"{render_board(self._board)}\nmodel: {self.mark}, invalid moves: {self._invalid}, {state}"

    @classmethod
    def example_conversations(cls, count: int, seed: int = 0) -> list[list[dict[str, str]]]:
        """``count`` whole games of the oracle against opponents of every strength (tokenizer training text).

        Args:
            count: Games; game ``i`` of the train split faces ``random_move_prob = i / (count - 1)``.
            seed: Seed of the games and of the oracle's tie-breaks.

        Returns:
            One conversation (role/content messages, the final board included) per game.
        """
        batch = EpisodeBatch([cls(size=max(count, 1), seed=seed) for _ in range(count)])
        batch.reset(options=[{"index": i, "random_move_prob": i / max(count - 1, 1)} for i in range(count)])
        play(batch, Player(seed=seed))
        return [list(obs["messages"]) for obs in batch.observations]
