"""The single-problem Gymnasium environment shared by every task."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from llm_gym.problems import ALL_SPLITS, ProblemSet, check_fractions, load_hf_dataset, problem_key, split_of
from llm_gym.registry import load_task
from llm_gym.rubric import Rubric
from llm_gym.spaces import messages_space, text_space
from llm_gym.task import Task
from llm_gym.template import ConversationTemplate
from llm_gym.usage import UsageError

__all__ = ["ReasoningEnv", "build_problems"]

logger = logging.getLogger(__name__)


def build_problems(
    task: Task,
    *,
    dataset: Any = None,
    split: str | None = None,
    size: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.0,
    **knobs: Any,
) -> ProblemSet:
    """The problems of one split of a task, from its generator or from data.

    Args:
        task: The task.
        dataset: ``None`` for the task's generator (for a task without one: its ``hf_dataset``);
            else a ``datasets.DatasetDict``, a ``datasets.Dataset``, or a hub id / local folder
            loaded through ``datasets``. Data with
            a ``test`` split gives its ``split``. Data without one (a single ``Dataset``, or the
            Countdown hub dataset, which has only ``train``) is split by a hash of each problem:
            ``test_fraction`` of the problems are the test split, the rest the train split, so
            train and test never share a problem.
        split: ``"train"``, ``"validation"`` or ``"test"``; ``None`` (the default): every row of data
            without a test split (the data a caller hands over is what the env runs on), else ``"train"``.
        size: Number of problems; default 1000 generated, or every row of the data.
        seed: Seed of the generated problems.
        test_fraction: Share of the problem space held out as the test split.
        validation_fraction: Share held out as the validation split (fitness), carved out of the
            training share by the same hash (data with its own ``validation`` split gives that);
            0 (the default) means no validation split, and the training split is as before.
        **knobs: The task's generator knobs (its config fields).

    Returns:
        The problem set.

    Raises:
        UsageError: if the data lacks the split, or the hash split of data without a test split
            comes out empty (naming how many distinct problems the data holds).
    """
    if dataset is None and task.generate is None and task.hf_dataset is not None:
        dataset = task.hf_dataset  # a data-only task reads its public dataset
    if dataset is None:
        config = task.make_config(**knobs)
        return ProblemSet.generated(
            task, config, split=split or "train", size=1000 if size is None else size, seed=seed,
            test_fraction=test_fraction, validation_fraction=validation_fraction,
        )
    task.make_config(**knobs)  # still reject unknown knobs
    if isinstance(dataset, (str, Path)):
        config_name = task.hf_config if str(dataset) == task.hf_dataset else None
        dataset = load_hf_dataset(dataset, split=None, config_name=config_name)
    rows = _take_split(task, dataset, split, test_fraction, validation_fraction)
    return ProblemSet.from_dataset(task, rows, split=split or "train", size=size)


def _take_split(
    task: Task, data: Any, split: str | None, test_fraction: float, validation_fraction: float = 0.0
) -> Any:
    """One split of ``data``: its own splits where it has them, else a hash split (``None``: all rows).

    Data with a ``test`` split gives it; its ``validation`` split too, else validation is carved out
    of its ``train`` split by hash (``validation_fraction`` of it). Data without a test split is split
    three ways by hash.
    """
    if split is not None:
        check_fractions(test_fraction, validation_fraction, split)
        if split not in ALL_SPLITS:
            raise UsageError(f"split must be one of {ALL_SPLITS}, got {split!r}")
    test_share = test_fraction
    if isinstance(data, Mapping):  # a DatasetDict (it also has column_names: a dict per split)
        if "test" in data:
            split = split or "train"
            if split in data and (split != "train" or validation_fraction == 0 or "validation" in data):
                return data[split]
            if "train" not in data:
                raise UsageError(f"the dataset has no split {split!r}; splits: {sorted(data.keys())}")
            test_share = 0.0  # the data's own test split is the test split: hash train vs validation only
        elif "train" not in data:
            raise UsageError(f"the dataset needs a 'train' split (and optionally 'test'); splits: {sorted(data.keys())}")
        data = data["train"]
    if split is None:
        return data  # the caller's rows, all of them
    columns = getattr(data, "column_names", None) or []
    if not len(data) or columns and not set(task.columns) <= set(columns):
        return data  # ProblemSet.from_dataset reports the empty data or the missing column
    logger.info("holding out %.0f%% (test) and %.0f%% (validation) of the problems by hash",
                100 * test_share, 100 * validation_fraction)  # fmt: skip
    indices = [i for i, row in enumerate(data)
               if split_of(problem_key(row, task.columns), test_share, validation_fraction) == split]  # fmt: skip
    kept = data.select(indices) if hasattr(data, "select") else [data[i] for i in indices]
    if len(kept) == 0:
        distinct = len({problem_key(row, task.columns) for row in data})
        shares = f", {100 * validation_fraction:.0f}% validation" if validation_fraction else ""
        raise UsageError(
            f"the {split!r} split of the data is empty: the data has no test split, so its problems are split by hash "
            f"({100 * test_share:.0f}% test{shares}), and none of its {distinct} "
            f"distinct problems ({len(data)} rows) falls in {split!r}; give a DatasetDict with a 'test' split, more "
            f"distinct problems, or split={'train' if split == 'test' else 'test'!r} (--split)"
        )
    return kept


class ReasoningEnv(gym.Env):
    """One reasoning problem per episode.

    ## Description
    ``reset`` draws a problem of the task and shows it as a conversation; ``step`` takes the
    model's completion (the text after the prompt), scores it with the task's rubric and ends
    the episode. Multi-turn tasks reuse this env with more steps.

    ## Observation
    A dict: ``messages``, a tuple of ``{"role", "content"}`` dicts (the last one is the assistant
    prefill when the template has one), and ``prompt``, the text rendered by the tokenizer's chat
    template, present only when a ``tokenizer`` is given. After ``step`` the messages end with the
    whole assistant turn (prefill + completion).

    ## Action
    The completion text (a ``gymnasium.spaces.Text``).

    ## Rewards
    The rubric's weighted total as a python ``float``; every part is in ``info["rewards"]``.

    ## Episode End
    Terminates after one step; never truncates.

    ## Arguments
    ``task`` (set by registration: a :class:`Task` or its ``"<module>:<name>"`` reference), ``dataset``, ``split``, ``size``, ``seed`` and the task's knobs
    (see :func:`build_problems`: data handed over without a test split and without ``split``
    gives an env over all its rows); ``tokenizer``; ``template`` and ``rubric`` (a :class:`Rubric` or
    one reward callable) to override the task's; ``max_prompt_chars`` and ``max_completion_chars``
    size the spaces; ``render_mode`` ``"ansi"`` renders the conversation as text.

    ## Version History
    * v0: initial version.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}  # render_fps: Gymnasium warns when it is missing

    def __init__(
        self,
        task: Task | str,
        *,
        dataset: Any = None,
        split: str | None = None,
        size: int | None = None,
        seed: int = 0,
        tokenizer: Any = None,
        template: ConversationTemplate | list[dict[str, str]] | None = None,
        rubric: Rubric | Callable[..., float] | None = None,
        max_prompt_chars: int = 16_384,
        max_completion_chars: int = 16_384,
        render_mode: str | None = None,
        **knobs: Any,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.task = task = load_task(task)
        self.problems = build_problems(task, dataset=dataset, split=split, size=size, seed=seed, **knobs)
        self.template = task.template if template is None else ConversationTemplate(template)
        self.template.validate_columns(task.problem_columns)
        self.rubric = task.rubric.copy() if rubric is None else Rubric.from_callable(rubric)
        self.tokenizer = tokenizer
        self.render_mode = render_mode
        obs = {"messages": messages_space(max_prompt_chars + max_completion_chars)}
        if tokenizer is not None:
            obs["prompt"] = text_space(2 * (max_prompt_chars + max_completion_chars))
        self.observation_space = spaces.Dict(obs)
        self.action_space = text_space(max_completion_chars)
        self._problem: dict[str, Any] | None = None
        self._index = -1
        self._obs: dict[str, Any] | None = None

    def _observe(self, messages: list[dict[str, str]], completion: str | None = None) -> dict[str, Any]:
        obs: dict[str, Any] = {"messages": tuple(dict(m) for m in messages)}
        if self.tokenizer is not None:
            assert self._problem is not None
            obs["prompt"] = self.template.render_text(self._problem, self.tokenizer) + (completion or "")
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Draw a problem (``options={"index": i}`` picks problem ``i``) and show it."""
        super().reset(seed=seed)
        if options and "index" in options:
            self._index = int(options["index"]) % len(self.problems)
        else:
            self._index = int(self.np_random.integers(len(self.problems)))
        self._problem = self.problems[self._index]
        self._obs = self._observe(self.template.render(self._problem))
        return self._obs, {"problem_index": self._index}

    def step(self, action: str) -> tuple[dict, float, bool, bool, dict]:
        """Score the completion and end the episode.

        Raises:
            RuntimeError: if called before ``reset``.
            TypeError: if the action is not a string.
        """
        if self._problem is None:
            raise RuntimeError("call reset() before step()")
        if not isinstance(action, str):
            raise TypeError(f"the action is the completion text (str), got {type(action).__name__}")
        prefill = self.template.prefill
        score = self.rubric.score(action, self._problem, prefill)
        messages = self.template.render(self._problem)
        if prefill:
            messages[-1] = {"role": "assistant", "content": prefill + action}
        else:
            messages.append({"role": "assistant", "content": action})
        self._obs = self._observe(messages, action)
        info = {
            **{c: self._problem[c] for c in self.task.columns},
            "rewards": dict(score.parts),
            "reward_errors": dict(score.errors),
            "correct": score.correct(self.task.correct_part),
            "problem_index": self._index,
        }
        return self._obs, float(score.total), True, False, info

    def render(self) -> str | None:
        """The conversation as text (``render_mode="ansi"``)."""
        if self.render_mode != "ansi" or self._obs is None:
            return None
        return "\n".join(f"[{m['role']}] {m['content']}" for m in self._obs["messages"])
