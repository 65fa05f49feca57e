"""Multi-turn text envs for the trainer: token ids turn by turn, and a batched env of episodes.

A multi-turn Gymnasium env (``llm_gym/TicTacToe-v0``) speaks in chat messages; the trainer speaks in
token ids. This module joins them without ever re-tokenising a rendered conversation:

* :func:`env_turn_ids` renders ONE environment message the way the chat template closes the model's
  turn, shows the message and opens the next assistant turn, and returns those ids. A trajectory is
  then ``prompt ids + model ids + env ids + model ids ...``: the model's tokens exactly as sampled.
  Re-rendering the whole conversation instead breaks the prefix as soon as the template rewrites
  earlier turns (Qwen3-style templates drop the ``<think>`` blocks of earlier assistant turns).
* :func:`conversation_ids` builds a finished conversation (SFT data) the same way, with labels on
  the assistant tokens only, so supervised warm-up trains exactly the token layout the rollout
  later produces. :class:`ConversationExample` wraps it for :func:`llm_gym.algorithms.sft.train_sft`.
* :class:`MultiTurnGym` serves batches of game setups (``reset`` options) like
  :class:`~llm_gym.reasoning_gym.ReasoningGym` serves problems, and plays ``P x G`` episodes of
  the pending batch, one env per trajectory: the protocol
  :class:`~llm_gym.algorithms.rollout.multi_turn.MultiTurnEnv` of the trainer's rollout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ConversationExample", "EnvTurn", "EpisodeRecord", "MultiTurnGym", "MultiTurnRecipe", "conversation_ids",
    "env_turn_ids", "multi_turn_recipe", "prompt_ids",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_MARKER = "MODELTURNMARKER"  # plain letters: no template strips or splits it (it has no <think>)


@dataclass(frozen=True)
class EnvTurn:
    """The environment's answer to one model turn of one trajectory.

    Attributes:
        tokens: Ids appended after the model's turn when the episode goes on (the environment's
            message and the template's tokens up to the next assistant turn); masked from the loss.
        done: The episode ended (won, lost, solved, or the environment's own turn cap).
    """

    tokens: Sequence[int] = ()
    done: bool = False


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(messages: Sequence[Mapping[str, str]], tokenizer: Any) -> list[int]:
    """Ids of the conversation's start, rendered with the generation prompt (what the model sees first)."""
    text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)
    return _encode(tokenizer, text)


def env_turn_ids(message: Mapping[str, str], tokenizer: Any, *, after: Sequence[int] = ()) -> list[int]:
    """Ids that follow a model turn: the template's end of that turn, ``message``, the next assistant header.

    The template renders a stand-in conversation (user, assistant ``MODELTURNMARKER``, then
    ``message``) and the text after the marker is tokenised alone, so only the template's own
    tokens between turns and the message appear, whatever the template does to earlier turns.

    Args:
        message: The environment's next message (role and content).
        tokenizer: A tokenizer with a chat template.
        after: The model turn these ids follow (its sampled ids). When it ended with the special
            token that closes a turn (EOS), that token is not repeated.

    Returns:
        The ids to append to the trajectory.

    >>> class Tok:  # a stand-in: one id per character, ChatML
    ...     all_special_ids = [2]
    ...     def apply_chat_template(self, messages, tokenize, add_generation_prompt):
    ...         body = "".join(f"[{m['role']}]{m['content']}$" for m in messages)
    ...         return body + ("[assistant]" if add_generation_prompt else "")
    ...     def __call__(self, text, add_special_tokens):
    ...         return {"input_ids": [2 if c == "$" else ord(c) for c in text]}
    >>> ids = env_turn_ids({"role": "user", "content": "hi"}, Tok(), after=[104, 2])
    >>> "".join(chr(i) for i in ids)
    '[user]hi\\x02[assistant]'
    """
    stand_in = [{"role": "user", "content": "A"}, {"role": "assistant", "content": _MARKER}, dict(message)]
    text = tokenizer.apply_chat_template(stand_in, tokenize=False, add_generation_prompt=True)
    ids = _encode(tokenizer, text[text.rindex(_MARKER) + len(_MARKER) :])
    if after and ids and after[-1] == ids[0] and _is_special(tokenizer, ids[0]):
        ids = ids[1:]  # the model closed its turn itself
    return ids


def _is_special(tokenizer: Any, token_id: int) -> bool:
    """Whether ``token_id`` is a special token (EOS, pad, or an added special token such as ``<|im_end|>``)."""
    if token_id in set(getattr(tokenizer, "all_special_ids", ()) or ()):
        return True
    added = (getattr(tokenizer, "added_tokens_decoder", None) or {}).get(token_id)
    return bool(getattr(added, "special", False))


def conversation_ids(messages: Sequence[Mapping[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """A whole conversation as the rollout builds it, with labels on the assistant tokens only.

    The prompt (messages before the first assistant turn) is rendered with the generation prompt;
    each assistant turn is its content's ids plus ``tokenizer.eos_token_id`` (how a sampled turn
    ends); each other message is :func:`env_turn_ids`. Labels are the ids on assistant tokens and
    ``-100`` elsewhere.

    Args:
        messages: Role/content messages with at least one assistant turn after the first message.
        tokenizer: A tokenizer with a chat template and an EOS token.

    Returns:
        ``(ids, labels)`` of equal length.

    Raises:
        ValueError: if no message after the first is an assistant turn.
    """
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0), None)
    if first is None:
        raise ValueError("a conversation example needs an assistant turn after the first message")
    ids = prompt_ids(messages[:first], tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    last: list[int] = []
    for message in messages[first:]:
        if message["role"] == "assistant":
            last = [*_encode(tokenizer, message["content"]), int(tokenizer.eos_token_id)]
            ids += last
            labels += last
        else:
            env = env_turn_ids(message, tokenizer, after=last)
            ids += env
            labels += [IGNORE_INDEX] * len(env)
    return ids, labels


@dataclass(frozen=True)
class ConversationExample:
    """A multi-turn SFT example: every assistant turn of ``messages`` is trained, nothing else."""

    messages: tuple[dict[str, str], ...]

    def tokenize(self, tokenizer: Any) -> tuple[list[int], list[int]]:
        """``(ids, labels)`` by :func:`conversation_ids`."""
        return conversation_ids(self.messages, tokenizer)


@dataclass
class EpisodeRecord:
    """One trajectory of the last finished batch."""

    options: dict[str, Any]
    """The ``reset`` options of its prompt."""
    observation: dict[str, Any]
    """The env's last observation (the whole conversation)."""
    info: dict[str, Any]
    """The env's last info (``rewards`` per part once the episode ended)."""
    reward: float = 0.0
    """The episode's return."""
    turns: int = 0
    """Model turns taken."""
    done: bool = False
    """Whether the env ended the episode (False: the rollout stopped it, see ``finish_episodes``)."""
    truncated: bool = False
    """Whether the env truncated it (its own turn cap)."""


class MultiTurnGym:
    """Batches of multi-turn episodes for the trainer (the rollout's ``MultiTurnEnv`` protocol).

    A *prompt* is a setup of the env (its ``reset`` options: which game, which opponent); its ``G``
    rollouts are ``G`` envs reset with the same options. The training split draws batches from
    ``train_options``; the test split walks ``test_options`` in order, as an evaluation needs.

    Args:
        make_env: ``make_env(split)``: a fresh env of that split (``"train"`` or ``"test"``).
        tokenizer: The model's tokenizer (chat template, EOS).
        train_options: ``train_options(batch_index)``: the ``reset`` options of the B prompts of
            training batch ``batch_index`` (deterministic, so a resumed run sees the same batches).
        test_options: Options of every held-out prompt, in evaluation order.
        data_batch_size_per_gpu: Prompts per batch (B).
        num_train: Size of the training split (for ``num_batches``/epochs).
        max_turns: Model turns after which the rollout stops a running episode.
        metrics_fn: Extra metrics of a finished batch from its :class:`EpisodeRecord` list.
        env_id: The env's id (run summaries and elites).

    Raises:
        ValueError: for a batch size below 1 or no test options.
    """

    def __init__(
        self,
        make_env: Callable[[str], Any],
        tokenizer: Any,
        *,
        train_options: Callable[[int], Sequence[Mapping[str, Any]]],
        test_options: Sequence[Mapping[str, Any]],
        data_batch_size_per_gpu: int = 8,
        num_train: int = 1000,
        max_turns: int = 8,
        metrics_fn: Callable[[Sequence[EpisodeRecord]], dict[str, float]] | None = None,
        env_id: str | None = None,
    ) -> None:
        if data_batch_size_per_gpu < 1:
            raise ValueError(f"data_batch_size_per_gpu must be >= 1, got {data_batch_size_per_gpu}")
        if not test_options:
            raise ValueError("test_options is empty: give at least one held-out setup")
        self.make_env, self.tokenizer = make_env, tokenizer
        self.train_options, self.test_options = train_options, [dict(o) for o in test_options]
        self.batch_size, self.num_train, self.max_turns = data_batch_size_per_gpu, num_train, max_turns
        self.metrics_fn, self.env_id = metrics_fn, env_id
        self.evaluation_mode = False
        self.num_epochs = 0
        self._position = {"train": 0, "test": 0}
        self._pending: dict[str, list[dict[str, Any]] | None] = {"train": None, "test": None}
        self._envs: dict[str, list[Any]] = {"train": [], "test": []}
        probe = make_env("train")
        self.rubric = getattr(getattr(probe, "unwrapped", probe), "rubric", None)
        self._records: list[EpisodeRecord] = []
        self.last_records: list[EpisodeRecord] = []
        self._group_size = 0

    # ------------------------------------------------------------- batches
    @property
    def split(self) -> str:
        """``"test"`` inside :meth:`eval_mode`, else ``"train"``."""
        return "test" if self.evaluation_mode else "train"

    def num_problems(self, split: str | None = None) -> int:
        """Prompts (setups) of ``split`` (default: the current one)."""
        return len(self.test_options) if (split or self.split) == "test" else self.num_train

    def num_batches(self, split: str | None = None) -> int:
        """Batches covering ``split`` once."""
        return -(-self.num_problems(split) // self.batch_size)

    def batch_size_of(self, split: str | None = None) -> int:
        """Prompts per batch of ``split``: ``data_batch_size_per_gpu`` for every split."""
        return self.batch_size

    def __len__(self) -> int:
        """Training setups."""
        return self.num_train

    def _env(self, split: str, i: int) -> Any:
        pool = self._envs[split]
        while len(pool) <= i:
            pool.append(self.make_env(split))
        return pool[i]

    def reset(self, reset_dataloaders: bool = False) -> list[dict[str, Any]]:
        """The next batch of prompts of the current split (``input_ids`` ``[1, L]`` each).

        Args:
            reset_dataloaders: Start the current split over.
        """
        import torch

        split = self.split
        if reset_dataloaders:
            self._position[split] = 0
        pos = self._position[split]
        if split == "train":
            options = [dict(o) for o in self.train_options(pos)]
            self._position[split] = pos + 1
            self.num_epochs = (pos + 1) * self.batch_size // max(self.num_train, 1)
        else:
            if pos >= len(self.test_options):
                pos = 0
            options = self.test_options[pos : pos + self.batch_size]
            self._position[split] = pos + len(options)
        self._pending[split] = options
        prompts = []
        for i, option in enumerate(options):
            obs, _ = self._env(split, i).reset(options=dict(option))
            ids = torch.tensor([prompt_ids(obs["messages"], self.tokenizer)], dtype=torch.long)  # [1, L]
            prompts.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "text": None})
        return prompts

    # ------------------------------------------------------------ episodes
    def start_episodes(self, group_size: int) -> None:
        """Reset ``G`` envs per pending prompt (trajectory ``p * G + g``).

        Raises:
            RuntimeError: if no batch is pending.
        """
        options = self._pending[self.split]
        if options is None:
            raise RuntimeError(f"no {self.split} batch is pending: call reset() first")
        self._group_size = group_size
        self._records = []
        for r in range(len(options) * group_size):
            option = options[r // group_size]
            obs, info = self._env(self.split, r).reset(options=dict(option))
            self._records.append(EpisodeRecord(options=dict(option), observation=obs, info=info))

    def step_episodes(self, turns: Mapping[int, Sequence[int]]) -> dict[int, EnvTurn]:
        """Apply each trajectory's latest model turn (sampled ids, EOS included when it stopped there)."""
        replies = {}
        for r, ids in turns.items():
            record = self._records[r]
            text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
            obs, reward, terminated, truncated, info = self._env(self.split, r).step(text)
            record.observation, record.info = obs, info
            record.reward += float(reward)
            record.turns += 1
            record.done, record.truncated = bool(terminated or truncated), bool(truncated)
            if record.done:
                replies[r] = EnvTurn(done=True)
            else:
                replies[r] = EnvTurn(tokens=env_turn_ids(obs["messages"][-1], self.tokenizer, after=list(ids)))
        return replies

    def finish_episodes(self) -> Any:
        """Returns ``[P, G]``: each episode's return.

        An episode the rollout stopped before it ended (its context length) is scored by the env's
        ``forfeit()`` when it has one (TicTacToe: a loss), else it keeps its return so far.
        """
        import torch

        for r, record in enumerate(self._records):
            if not record.done:  # the rollout stopped it (context length): the env scores it, if it can
                env = self._env(self.split, r)
                forfeit = getattr(getattr(env, "unwrapped", env), "forfeit", None)
                reward, info = forfeit() if forfeit is not None else (0.0, record.info)
                record.reward, record.info = record.reward + float(reward), dict(info)
        self.last_records = list(self._records)
        rewards = [record.reward for record in self._records]
        return torch.tensor(rewards, dtype=torch.float32).reshape(-1, self._group_size)

    def last_metrics(self) -> dict[str, float]:
        """Means over the last finished batch: ``reward/total``, ``reward/<part>``, ``turns``, and ``metrics_fn``'s."""
        records = self.last_records
        if not records:
            return {}
        parts = sorted({name for r in records for name in r.info.get("rewards", {})})
        metrics = {"reward/total": float(np.mean([r.reward for r in records]))}
        for name in parts:
            metrics[f"reward/{name}"] = float(np.mean([r.info.get("rewards", {}).get(name, 0.0) for r in records]))
        metrics["reward/failures"] = float(sum(len(r.info.get("reward_errors", {})) for r in records))
        metrics["episode/turns"] = float(np.mean([r.turns for r in records]))
        metrics["episode/unfinished"] = float(np.mean([not r.done for r in records]))
        if self.metrics_fn is not None:
            metrics.update(self.metrics_fn(records))
        return metrics

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Serve the held-out setups inside the ``with`` block."""
        previous = self.evaluation_mode
        self.evaluation_mode = True
        try:
            yield
        finally:
            self.evaluation_mode = previous

    def state_dict(self) -> dict[str, Any]:
        """Batch positions, to resume a run where it stopped."""
        return {"position": dict(self._position), "num_epochs": self.num_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (call ``reset`` afterwards)."""
        self._position = {k: int(v) for k, v in state["position"].items()}
        self.num_epochs = int(state.get("num_epochs", 0))


@dataclass(frozen=True)
class MultiTurnRecipe:
    """How the main job (``llm-gym train``) trains and evaluates a multi-turn env.

    A multi-turn env offers one as ``RECIPE`` in the module of its entry point or in that module's
    package (``llm_gym.tasks.tictactoe.RECIPE``; :func:`multi_turn_recipe` finds it); the recipe
    then takes its SFT data, batched env and held-out report from here instead of a task's oracle.
    """

    tokenizer_env_ids: tuple[str, ...]
    """Envs whose text trains the embedded tiny model's tokenizer."""
    sft_examples: Callable[..., list[Any]]
    """``sft_examples(num_games, seed=...)``: multi-turn SFT examples (:class:`ConversationExample`)."""
    make_env: Callable[..., MultiTurnGym]
    """``make_env(tokenizer, data_batch_size_per_gpu=, test_games=, train_size=, seed=, **knobs)``."""
    report: Callable[[Sequence[EpisodeRecord]], str]
    """A plain-text table of finished held-out episodes (``llm-gym eval``)."""
    oracle_report: Callable[..., str]
    """``oracle_report(num_games, seed=..., **knobs)``: the same table for the env's scripted oracle."""
    sft_seq_len: int = 1024
    """Sequence length of the SFT warm-up (whole conversations)."""
    max_model_len: int = 1024
    """Context length of a trajectory during RL."""


def multi_turn_recipe(env_id: str) -> MultiTurnRecipe | None:
    """The :class:`MultiTurnRecipe` of a registered env, or ``None`` for a single-turn task env.

    The recipe is the ``RECIPE`` attribute of the module that holds the env's entry point, else of
    that module's package (so a game's env module never imports its training module).

    Args:
        env_id: A registered environment id.

    Returns:
        The recipe, or None when neither module defines one.

    Raises:
        gymnasium.error.Error: If ``env_id`` is not registered.
    """
    import importlib

    import gymnasium as gym

    entry = gym.spec(env_id).entry_point
    module_name = entry.partition(":")[0] if isinstance(entry, str) else getattr(entry, "__module__", "")
    candidates = [module_name, module_name.rpartition(".")[0]]
    for name in filter(None, candidates):
        recipe = getattr(importlib.import_module(name), "RECIPE", None)
        if isinstance(recipe, MultiTurnRecipe):
            return recipe
    return None
