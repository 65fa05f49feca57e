"""One rollout of an evaluation: a problem, one sampled answer, and its score (or why there is none).

Every policy (the task's oracle, a local model, an OpenAI-compatible endpoint) produces these same
records, so the report table, the JSONL log and the saved dataset look the same whoever answered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from llm_gym.rubric import Score

__all__ = ["RolloutRecord", "failed_record", "jsonable", "scored_record"]


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays and tuples turned into plain JSON types (recursively)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy array or scalar
        return jsonable(value.tolist())
    return value


@dataclass(frozen=True)
class RolloutRecord:
    """One answer to one problem.

    Attributes:
        problem: Index of the problem in the evaluated split (``0 .. n-1``).
        sample: Which of the ``R`` samples of that problem (``0 .. R-1``).
        prompt: The conversation sent (role/content messages; a final assistant message is a prefill).
        completion: The answer's text (what follows the prompt), or ``None`` when the request failed.
        reward: Total reward, ``None`` when failed.
        correct: Exact accuracy (the task's correct part scored 1), ``None`` when failed.
        parts: Each rubric part's (unweighted) score; empty when failed.
        completion_tokens: Tokens of the answer when the policy reports them, else ``None``.
        error: Why the request failed (after its retries), else ``None``. A failed request is
            counted and shown, never scored as a wrong answer.
        columns: The problem's own columns.
        completion_messages: A multi-turn episode's messages after the prompt (the model's turns and
            the env's replies, ending on the model's last turn); ``None`` for a single answer, whose
            completion is the one assistant message ``completion``.
    """

    problem: int
    sample: int
    prompt: list[dict[str, str]]
    completion: str | None
    reward: float | None
    correct: bool | None
    parts: dict[str, float] = field(default_factory=dict)
    completion_tokens: int | None = None
    error: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    completion_messages: list[dict[str, str]] | None = None

    @property
    def key(self) -> str:
        """``"<problem>:<sample>"``, unique within an evaluation."""
        return f"{self.problem}:{self.sample}"

    @property
    def messages(self) -> list[dict[str, str]]:
        """The completion as chat messages (the dataset's ``completion`` column)."""
        if self.completion_messages is not None:
            return [dict(m) for m in self.completion_messages]
        return [{"role": "assistant", "content": self.completion or ""}]

    @property
    def failed(self) -> bool:
        """True when the answer could not be obtained."""
        return self.error is not None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (see :meth:`from_json`)."""
        return jsonable(asdict(self))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutRecord:
        """The record of :meth:`to_json`."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def scored_record(
    problem: int,
    sample: int,
    columns: Mapping[str, Any],
    prompt: Sequence[Mapping[str, str]],
    completion: str,
    score: Score,
    correct_part: str | None,
    completion_tokens: int | None = None,
) -> RolloutRecord:
    """The record of an answer the rubric scored.

    Args:
        problem: Problem index.
        sample: Sample index.
        columns: The problem's columns.
        prompt: The messages sent.
        completion: The answer's text.
        score: Its rubric score.
        correct_part: The task's "right answer" part (exact accuracy); ``None``: correct is False.
        completion_tokens: Tokens of the answer, when known.

    Returns:
        The record.
    """
    return RolloutRecord(
        problem=problem, sample=sample, prompt=[dict(m) for m in prompt], completion=completion,
        reward=float(score.total), correct=bool(correct_part is not None and score.correct(correct_part)),
        parts={k: float(v) for k, v in score.parts.items()}, completion_tokens=completion_tokens,
        columns=jsonable(dict(columns)),
    )  # fmt: skip


def failed_record(
    problem: int, sample: int, columns: Mapping[str, Any], prompt: Sequence[Mapping[str, str]], error: str
) -> RolloutRecord:
    """The record of a request that failed after its retries (no completion, no score)."""
    return RolloutRecord(
        problem=problem, sample=sample, prompt=[dict(m) for m in prompt], completion=None, reward=None,
        correct=None, error=error, columns=jsonable(dict(columns)),
    )  # fmt: skip
