"""GSM8K: grade-school math word problems with a numeric answer (``llm_gym/GSM8K-v0``).

## Description
The problems of the public ``openai/gsm8k`` dataset (configuration ``main``: 7,473 train and
1,319 test problems). A row has ``question`` (the word problem) and ``answer`` (a worked solution
whose last line is ``#### <number>``, e.g. ``#### 72`` or ``#### 1,000``). The task has no
generator: without a ``dataset`` argument the hub dataset is loaded through ``datasets`` (network
or the local hub cache); any ``Dataset``/``DatasetDict``/folder in the same schema works offline.
The dataset's own ``test`` split is the test split.

## Prompt
A system message (Countdown's), the ``question`` with an instruction to answer with one number in
``<answer>`` tags, and the assistant prefill ``"Let me solve this step by step.\\n<think>"``.

## Answer format
``" Natalia sold 48/2 = 24 clips in May. ... </think>\\n<answer>72</answer>"`` (continuing the
prefill): the reasoning, then one ``<answer>`` holding the number.

## Rewards (weights 1 and 1, total in [0, 2])
* ``format`` in {0, 1}: Countdown's ``format_reward`` (``<think>...</think>\\n<answer>...</answer>``).
* ``accuracy`` in {0, 1}, the ``correct_part``: the only ``<answer>`` holds the reference number,
  compared exactly as a ``Fraction``. Accepted around the number: a sign, ``$``, thousands commas
  (``1,000``), decimals (``72.0``), words and units (``72 dollars``, ``25%``), LaTeX wrappers
  (``\\boxed{72}``, ``\\$72``), a lead-in (``x = 72``). Rejected: a different number; several
  different numbers (``72 or 73``); no number; any arithmetic to evaluate (``70+2``, ``144/2``,
  ``36*2``, ``5-3``, ``\\frac{144}{2}``, even ``70 + 2 = 72``); an answer longer than 200
  characters. Nothing is ever evaluated: the text is only scanned by
  linear regular expressions, so any input costs at most a few microseconds per character.

## Oracle
The dataset's worked solution with its calculator annotations (``<<48/2=24>>``) removed, as the
reasoning, and the reference number as the answer.

## Arguments
The env's ``dataset`` (default: the hub's ``openai/gsm8k``, ``main``), ``split``, ``size``,
``seed`` (unused: the problems are the data's, in order), ``tokenizer``, ``template``, ``rubric``.
GSM8K has no generator knobs.

## Version History
* v0: initial version.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from llm_gym.registry import register_task
from llm_gym.rubric import Rubric
from llm_gym.task import Task
from llm_gym.tasks.countdown import PREFILL, extract_answer, format_reward
from llm_gym.tasks.countdown import TEMPLATE as COUNTDOWN_TEMPLATE
from llm_gym.template import ConversationTemplate

__all__ = ["parse_number", "reference_number", "solve", "accuracy_reward", "TASK", "TEMPLATE"]

_MAX_ANSWER_CHARS = 200
# A number: optional sign, digits with optional thousands commas, optional decimals. Not glued to a
# letter, digit, '.' or ',' on either side, so "x2", "72k", "1,0000" and "1.2.3" hold no clean number.
_NUMBER = re.compile(r"(?<![\w.,])([-−]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\w|[.,]\d)", re.ASCII)
# Arithmetic the verifier would have to do: a binary operator between two numbers ("70+2", "(6) x (6)",
# "5 - 3"); "**72**" (bold) and "x = 72" are not arithmetic.
_OPERATOR = re.compile(r"[\d)}]\s*[-−+*×xX·÷/^]\s*[-−$(\\{]?\s*\d", re.ASCII)
_LATEX_COMMA = "{,}"  # LaTeX thousands separator: 1{,}000
_ANNOTATION = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations: 48/2 = <<48/2=24>>24
_REFERENCE = re.compile(r"[-−]?\d+(?:\.\d+)?")


def _fraction(sign: str, digits: str, decimals: str | None) -> Fraction:
    value = Fraction(digits.replace(",", "") + (decimals or ""))
    return -value if sign else value


def parse_number(text: str) -> Fraction | None:
    """The one number an answer states, or ``None`` (see the card for what is accepted).

    >>> parse_number("$1,000.50")
    Fraction(2001, 2)
    >>> parse_number("\\\\boxed{72} dollars")
    Fraction(72, 1)
    >>> parse_number("70+2") is None, parse_number("72 or 73") is None
    (True, True)

    Args:
        text: The content of the answer tag.

    Returns:
        The exact value, or ``None`` when the text holds no number, several different numbers,
        arithmetic, or more than 200 characters.
    """
    if not isinstance(text, str) or len(text) > _MAX_ANSWER_CHARS:
        return None
    text = text.replace(_LATEX_COMMA, ",")
    if _OPERATOR.search(text):
        return None
    values = {_fraction(*m.groups()) for m in _NUMBER.finditer(text)}
    return values.pop() if len(values) == 1 else None


def reference_number(answer: str) -> Fraction:
    """The reference value from a GSM8K solution's last ``#### N`` line (commas allowed).

    >>> reference_number("3 + 4 = <<3+4=7>>7\\n#### 1,007")
    Fraction(1007, 1)

    Raises:
        ValueError: if there is no ``####`` line with a plain number after it.
    """
    if "####" not in answer:
        raise ValueError(f"a GSM8K answer ends with '#### <number>'; got {answer[-80:]!r}")
    tail = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not _REFERENCE.fullmatch(tail):
        raise ValueError(f"the '####' line of a GSM8K answer must hold one number, got {tail!r}")
    return Fraction(tail.replace("−", "-"))


def solve(problem: Mapping[str, Any]) -> str:
    """The oracle: the dataset's worked solution, reformatted to continue :data:`PREFILL`.

    Args:
        problem: A problem with ``answer`` (the worked solution ending in ``#### N``).

    Returns:
        E.g. ``" Natalia sold 48/2 = 24 clips in May.\\n... </think>\\n<answer>72</answer>"``.
    """
    answer = str(problem["answer"])
    reference_number(answer)  # reject a malformed row here rather than write a wrong example
    steps, number = answer.rsplit("####", 1)
    reasoning = _ANNOTATION.sub("", steps).strip()
    return f" {reasoning} </think>\n<answer>{number.strip()}</answer>"


def accuracy_reward(completion: str, *, answer: str, prefill: str = "", **_: Any) -> float:
    """1.0 iff the only ``<answer>`` states the reference number (exact, as a ``Fraction``).

    >>> accuracy_reward(" 2*36=72 </think>\\n<answer>$72</answer>", answer="... #### 72")
    1.0
    >>> accuracy_reward(" 2*36=72 </think>\\n<answer>2*36</answer>", answer="... #### 72")
    0.0
    """
    text = extract_answer(completion, prefill=prefill)
    value = None if text is None else parse_number(text)
    return 1.0 if value is not None and value == reference_number(answer) else 0.0


_INSTRUCTION = " ".join(
    textwrap.dedent(
        """
        Show your work in <think> </think> tags. And return the final answer, one number, in
        <answer> </answer> tags, for example <answer>42</answer>.
        """
    ).split()
)

TEMPLATE = ConversationTemplate(
    [
        COUNTDOWN_TEMPLATE.as_dicts()[0],  # the same system message as Countdown
        {"role": "user", "content": "{question}\n" + _INSTRUCTION},
        {"role": "assistant", "content": PREFILL},
    ]
)

TASK = Task(
    name="GSM8K",
    version=0,
    columns=("question", "answer"),
    question_column="question",
    answer_column="answer",
    template=TEMPLATE,
    rubric=Rubric([format_reward, accuracy_reward], [1.0, 1.0], names=["format", "accuracy"]),
    correct_part="accuracy",
    solve=solve,
    hf_dataset="openai/gsm8k",
    hf_config="main",
    description="Grade-school math word problems (openai/gsm8k); one exact number.",
)

register_task(TASK)
