"""reasoning-gym: any dataset of the reasoning-gym library as an environment (``llm_gym/RG-v0``).

## Description
``gym.make("llm_gym/RG-v0", name="leg_counting", min_animals=2)`` wraps one of the 100+
procedural datasets of the ``reasoning-gym`` package (optional extra:
``pip install 'llm-gym[reasoning-gym]'``; ``llm-gym list --rg`` lists the names). Its question is
the user message and its own ``score_answer`` scores the answer. ``import llm_gym`` does not
import ``reasoning_gym`` (a ~3 s import): it is imported when an env is built.

Problem ``i`` of a split is item ``k`` of the reasoning-gym dataset built with ``seed=0`` and
``size=pool_size``, ``k`` drawn from the env's seed, split and ``i``; the content hash of the
problem then decides its split as for every generated task, so train and test never share a
problem. A dataset instance is built once per process and configuration (some load word lists or
precompute their items: up to seconds).

## Prompt
A system message (Countdown's), the dataset's question followed by an instruction to answer in
``<answer>`` tags, and the assistant prefill ``"Let me solve this step by step.\\n<think>"``.

## Answer format
``" ... </think>\\n<answer>...</answer>"``; the answer's own format is the one its question asks
for (reasoning-gym's convention: the answer inside ``<answer>`` tags).

## Rewards (weights 1 and 1, total in [0, 2])
* ``format`` in {0, 1}: Countdown's ``format_reward`` (``<think>...</think>\\n<answer>...</answer>``).
* ``score`` in [0, 1], the ``correct_part`` (exact accuracy: a score of 1.0): the dataset's
  ``score_answer(answer, entry)`` on the stripped content of the only ``<answer>`` (0 when there
  is not exactly one). It runs under the rubric's time limit (5 s; some scorers use sympy and can
  hang): a timeout scores 0 and is counted. Scorers that raise on a malformed answer (e.g.
  ``prime_factorization`` calls ``int()`` on it) score 0 like any unparseable answer.

## Oracle
The dataset's reference ``answer`` with an empty reasoning (``None`` for the few datasets whose
entries have no single reference answer, such as ``graph_color`` or ``rubiks_cube``).

## Arguments
``name`` (the dataset, default ``"leg_counting"``), ``pool_size`` (items the problems are drawn
from, default 10,000), and the fields of the dataset's config class except ``seed`` and ``size``
(e.g. ``min_animals``); plus the env's ``dataset``, ``split``, ``size``, ``seed``, ``tokenizer``,
``template``, ``rubric``. Columns: ``question``, ``answer``, ``metadata`` (the entry's metadata as
JSON, tuples kept) and ``source`` (JSON of the dataset name and config).

## Version History
* v0: initial version.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_gym.registry import register_task
from llm_gym.rubric import Rubric
from llm_gym.task import Task
from llm_gym.tasks.countdown import PREFILL, extract_answer, format_reward
from llm_gym.tasks.countdown import TEMPLATE as COUNTDOWN_TEMPLATE
from llm_gym.template import ConversationTemplate

__all__ = [
    "RGConfig", "dataset_names", "configure", "generate", "solve", "score_reward", "encode_metadata",
    "decode_metadata", "TASK",
]

logger = logging.getLogger(__name__)

ENV_ID = "llm_gym/RG-v0"
_OWN_FIELDS = ("seed", "size")  # set by the adapter, not knobs: the env has its own seed and size


@dataclass(frozen=True)
class RGConfig:
    """Which reasoning-gym dataset, configured how. Build it through the env's kwargs (:func:`configure`)."""

    name: str = "leg_counting"
    """The reasoning-gym dataset (``llm-gym list --rg``)."""
    params: tuple[tuple[str, Any], ...] = ()
    """The dataset's config fields that differ from its defaults, as sorted ``(field, value)`` pairs."""
    pool_size: int = 10_000
    """Items of the reasoning-gym dataset the problems are drawn from (its ``size``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.pool_size, int) or self.pool_size < 1:
            raise ValueError(f"RGConfig.pool_size={self.pool_size!r} must be a positive int")

    @property
    def source(self) -> str:
        """Canonical JSON of the name and config (the ``source`` column; a scorer is built from it)."""
        return json.dumps({"name": self.name, "config": dict(self.params)}, sort_keys=True)


def _reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"{ENV_ID} needs the reasoning-gym package: pip install 'llm-gym[reasoning-gym]'"
        ) from err
    return reasoning_gym


def _registered() -> dict[str, tuple[type, type]]:
    _reasoning_gym()
    from reasoning_gym.factory import DATASETS

    return DATASETS


def dataset_names() -> list[tuple[str, str]]:
    """Every reasoning-gym dataset name with the first line of its class docstring, sorted.

    Raises:
        ModuleNotFoundError: when reasoning-gym is not installed, saying how to install it.
    """
    rows = []
    for name, (cls, _) in sorted(_registered().items()):
        line = ((cls.__doc__ or "").strip().splitlines() or [""])[0]
        rows.append((name, line if len(line) <= 90 else line[:87] + "..."))
    return rows


@functools.lru_cache(maxsize=16)  # building a dataset can take seconds (word lists, precomputed items)
def _instance(source: str, size: int) -> Any:
    spec = json.loads(source)
    return _reasoning_gym().create_dataset(spec["name"], seed=0, size=size, **spec["config"])


def configure(config: RGConfig, knobs: dict[str, Any]) -> RGConfig:
    """The config for the env's kwargs: ``name``, ``pool_size`` and the dataset's own fields.

    A new ``name`` starts from that dataset's defaults; the dataset checks the values (its
    ``validate``) here, when the env is made.

    Args:
        config: The current config (the task's default).
        knobs: The env kwargs beyond the env's own.

    Returns:
        The new config.

    Raises:
        ModuleNotFoundError: when reasoning-gym is not installed.
        ValueError: for an unknown dataset name (with near matches) or values the dataset rejects.
        TypeError: for a field the dataset's config does not have (naming the valid ones).
    """
    knobs = dict(knobs)
    name = knobs.pop("name", config.name)
    pool_size = knobs.pop("pool_size", config.pool_size)
    registered = _registered()
    if name not in registered:
        close = difflib.get_close_matches(str(name), registered, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"reasoning-gym has no dataset {name!r}.{hint} See llm-gym list --rg")
    fields = sorted(f.name for f in dataclasses.fields(registered[name][1]) if f.name not in _OWN_FIELDS)
    unknown = sorted(set(knobs) - set(fields))
    if unknown:
        raise TypeError(
            f"{ENV_ID} name={name!r} got unknown argument {unknown[0]!r}; its knobs are name, pool_size and "
            f"{', '.join(fields) or '(none)'}, plus dataset, split, size, seed, tokenizer, template, rubric"
        )
    params = {**(dict(config.params) if name == config.name else {}), **knobs}
    new = RGConfig(name=name, params=tuple(sorted(params.items())), pool_size=pool_size)
    try:
        source = new.source
    except TypeError as err:
        raise TypeError(f"{ENV_ID} name={name!r}: knob values must be JSON values (numbers, strings, lists): {err}") from None
    try:
        _instance(source, 1)  # the dataset's own checks (its validate: asserts) happen here
    except (AssertionError, ValueError, TypeError) as err:
        raise ValueError(f"reasoning-gym rejected the config of {name!r} {params}: {err}") from None
    return new


# Entries' metadata is stored as JSON (arrow-safe, hash-stable, saved with datasets) that keeps what
# scorers compare: tuples (arc_agi compares a tuple grid) and dicts with non-string keys (graph_color).
_TUPLE, _ITEMS = "__tuple__", "__items__"


def _encode(value: Any) -> Any:
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not ({_TUPLE, _ITEMS} & set(value)):
            return {k: _encode(v) for k, v in value.items()}
        return {_ITEMS: [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"reasoning-gym metadata holds a {type(value).__name__}, which the adapter cannot store")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE}:
            return tuple(_decode(v) for v in value[_TUPLE])
        if set(value) == {_ITEMS}:
            return {_decode(k): _decode(v) for k, v in value[_ITEMS]}
        return {k: _decode(v) for k, v in value.items()}
    return value


def encode_metadata(metadata: Mapping[str, Any]) -> str:
    """An entry's metadata as JSON text that :func:`decode_metadata` turns back into equal python values."""
    return json.dumps(_encode(dict(metadata)), sort_keys=True)


def decode_metadata(text: str) -> dict[str, Any]:
    """The metadata dict of :func:`encode_metadata`'s text."""
    return _decode(json.loads(text))


def generate(rng: np.random.Generator, config: RGConfig) -> dict[str, Any]:
    """One problem: an item of the configured reasoning-gym dataset, drawn by ``rng``.

    Returns:
        ``{"question", "answer", "metadata", "source"}`` (``answer`` may be ``None``).
    """
    entry = _instance(config.source, config.pool_size)[int(rng.integers(config.pool_size))]
    return {
        "question": entry["question"],
        "answer": entry["answer"],
        "metadata": encode_metadata(entry["metadata"]),
        "source": config.source,
    }


def solve(problem: Mapping[str, Any]) -> str | None:
    """The oracle: the reference answer after an empty reasoning, or ``None`` when there is none."""
    answer = problem["answer"]
    return None if answer is None else f" </think>\n<answer>{answer}</answer>"


def score_reward(
    completion: str, *, question: str, answer: str | None, metadata: str, source: str, prefill: str = "", **_: Any
) -> float:
    """The dataset's ``score_answer`` on the one ``<answer>`` (0.0 when there is not exactly one)."""
    text = extract_answer(completion, prefill=prefill)
    if text is None:
        return 0.0
    entry = {"question": question, "answer": answer, "metadata": decode_metadata(metadata)}
    scorer = _instance(source, 1)
    try:
        return float(scorer.score_answer(text, entry))
    except Exception as err:  # the scorer choked on the model's text (a timeout is not an Exception)
        logger.debug("%s score_answer raised %s: %s; scored 0", json.loads(source)["name"], type(err).__name__, err)
        return 0.0


TEMPLATE = ConversationTemplate(
    [
        COUNTDOWN_TEMPLATE.as_dicts()[0],  # the same system message as Countdown
        {
            "role": "user",
            "content": "{question}\n\nShow your work in <think> </think> tags. And return the final answer in "
            "<answer> </answer> tags.",
        },
        {"role": "assistant", "content": PREFILL},
    ]
)

TASK = Task(
    name="RG",
    version=0,
    columns=("question", "answer", "metadata", "source"),
    question_column="question",
    answer_column="answer",
    template=TEMPLATE,
    rubric=Rubric([format_reward, score_reward], [1.0, 1.0], names=["format", "score"]),
    correct_part="score",
    config=RGConfig(),
    generate=generate,
    solve=solve,
    description="Any reasoning-gym dataset (name=...), scored by its own score_answer.",
    requires=("reasoning_gym",),
    configure=configure,
)

register_task(TASK)
