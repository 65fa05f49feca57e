"""The :class:`Task`: where problems come from, how they are shown, how they are scored.

A task is declared once, in one file of ``llm_gym.tasks``, and every environment (the
single-problem :class:`~llm_gym.env.ReasoningEnv` and the batched
:class:`~llm_gym.reasoning_gym.ReasoningGym`) is built from it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_gym.rubric import Rubric
from llm_gym.template import ConversationTemplate

__all__ = ["Task"]

Problem = dict[str, Any]


@dataclass(frozen=True)
class Task:
    """A reasoning task.

    Attributes:
        name: Name in the env id, e.g. ``"Countdown"`` for ``llm_gym/Countdown-v0``.
        version: Bumped whenever the prompt, the rewards or the splits change.
        columns: The dataset columns one problem needs, e.g. ``("nums", "target")``.
        question_column: The column that ``{question}`` stands for in templates.
        answer_column: The column that ``{answer}`` stands for (the reference answer).
        template: The default conversation template.
        rubric: The default weighted reward functions.
        correct_part: Name of the rubric part that scores 1.0 exactly when the answer is right
            (exact accuracy in evaluations).
        config: A frozen dataclass of generator knobs (difficulty); its fields are env kwargs.
        generate: ``(rng, config) -> problem`` draws one problem, or ``None`` for data-only tasks.
        solve: ``problem -> completion`` the oracle: a reference completion with its reasoning,
            written to follow the default template's prefill (used for SFT warm-up), or ``None``.
        hf_dataset: Hub id of the public dataset in this task's schema, if any. A task without a
            generator reads it when no ``dataset`` is given (network or the local hub cache).
        description: One line for listings.
        hf_config: The configuration name of ``hf_dataset`` (``"main"`` for ``openai/gsm8k``).
        requires: Modules of an optional extra the task needs (``("reasoning_gym",)``); imported
            only when its problems are built. Tests and ``llm-gym eval`` skip a task whose
            requirements are missing (:attr:`missing_requirements`).
        configure: ``(config, knobs) -> config`` replaces the default knob handling of
            :meth:`make_config` for a task whose knobs are not the fixed fields of one dataclass
            (the reasoning-gym adapter: each of its datasets has its own fields).
    """

    name: str
    version: int
    columns: tuple[str, ...]
    question_column: str
    answer_column: str
    template: ConversationTemplate
    rubric: Rubric
    correct_part: str
    config: Any = None
    generate: Callable[[np.random.Generator, Any], Problem] | None = None
    solve: Callable[[Mapping[str, Any]], str | None] | None = None
    hf_dataset: str | None = None
    description: str = ""
    hf_config: str | None = None
    requires: tuple[str, ...] = ()
    configure: Callable[[Any, dict[str, Any]], Any] | None = None

    def __post_init__(self) -> None:
        for col in (self.question_column, self.answer_column):
            if col not in self.columns:
                raise ValueError(f"task {self.name}: column {col!r} is not one of columns {self.columns}")
        if self.correct_part not in self.rubric.names:
            raise ValueError(
                f"task {self.name}: correct_part {self.correct_part!r} is not a rubric part {self.rubric.names}"
            )
        self.template.validate_columns(self.problem_columns)

    @property
    def env_id(self) -> str:
        """The Gymnasium id, ``llm_gym/<name>-v<version>``."""
        return f"llm_gym/{self.name}-v{self.version}"

    @property
    def missing_requirements(self) -> tuple[str, ...]:
        """The modules of :attr:`requires` that are not installed (found without importing them)."""
        return tuple(module for module in self.requires if importlib.util.find_spec(module) is None)

    @property
    def problem_columns(self) -> tuple[str, ...]:
        """The task columns plus the ``question`` and ``answer`` aliases templates may use."""
        return tuple(dict.fromkeys((*self.columns, "question", "answer")))

    def make_config(self, **knobs: Any) -> Any:
        """The generator config with ``knobs`` replaced.

        Raises:
            TypeError: naming an unknown knob and the valid ones.
        """
        if self.configure is not None:
            return self.configure(self.config, dict(knobs))
        if self.config is None:
            if knobs:
                raise TypeError(f"task {self.name} has no generator knobs; got {sorted(knobs)}")
            return None
        valid = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(knobs) - valid)
        if unknown:
            raise TypeError(
                f"{self.env_id} got unknown argument {unknown[0]!r}; its knobs are {sorted(valid)}, "
                "plus dataset, split, size, seed, tokenizer, template, rubric"
            )
        return dataclasses.replace(self.config, **knobs)

    def to_problem(self, row: Mapping[str, Any]) -> Problem:
        """One problem dict from a dataset row or generator output, with the aliases added.

        Raises:
            KeyError: naming a missing column and the columns the row has.
        """
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise KeyError(
                f"{self.env_id} needs column {missing[0]!r}; the data has columns {sorted(row)}. "
                "Rename columns to the task's schema "
                f"{list(self.columns)} (datasets.Dataset.rename_column)"
            )
        problem = {c: row[c] for c in self.columns}
        problem["question"] = row[self.question_column]
        problem["answer"] = row[self.answer_column]
        return problem
