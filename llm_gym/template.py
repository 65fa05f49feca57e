"""Conversation templates: role/content messages with ``{column}`` placeholders.

A template is the list of chat messages shown to the model for one problem. Each message's
content may hold placeholders such as ``{question}``, ``{answer}`` or any other column of the
problem. The last message may be an *assistant prefill*: text the assistant turn starts with
(for example ``"Let me solve this step by step.\\n<think>"``); the model continues it.

What reward functions see: the **completion only**, the text generated after the prompt. The
prefill is passed to rubric reward functions as the keyword ``prefill`` so they can check the
whole assistant turn (``prefill + completion``). A plain seed-style ``reward_fn(completion,
answer, question)`` gets the completion only, exactly as in AgileRL, which is why the seed's
format reward prepends ``"<think>"`` itself.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ConversationTemplate", "TemplateError", "format_value"]

_ROLES = ("system", "user", "assistant")


class TemplateError(ValueError):
    """A conversation template is malformed or names a column the problem lacks."""


def format_value(value: Any) -> str:
    """Render a column value the way it appears in a prompt.

    Lists, tuples and numpy arrays print as python lists (``[44, 19, 35]``), so a dataset in
    torch/numpy format renders the same prompt as one in python format.

    Args:
        value: Any column value.

    Returns:
        Its text form.
    """
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, tuple):
        value = list(value)
    return str(value)


def _placeholders(text: str) -> list[str]:
    names = []
    for _, field, _, _ in string.Formatter().parse(text):
        if field is None:
            continue
        if field == "" or not field.isidentifier():
            raise TemplateError(
                f"placeholder {{{field}}} is not a column name: use {{column}} with a plain name, "
                "and double the braces ({{ and }}) for a literal brace"
            )
        names.append(field)
    return names


@dataclass(frozen=True)
class ConversationTemplate:
    """Chat messages with ``{column}`` placeholders and an optional assistant prefill.

    Args:
        messages: ``[{"role": ..., "content": ...}, ...]``; roles are system, user, assistant.
            An assistant message is allowed only as the last one, where it is the prefill.
    """

    messages: tuple[tuple[str, str], ...]

    def __init__(self, messages: Sequence[Mapping[str, str]] | ConversationTemplate) -> None:
        if isinstance(messages, ConversationTemplate):
            messages = messages.as_dicts()
        if not messages:
            raise TemplateError("a conversation template needs at least one message")
        parsed = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping) or set(msg) != {"role", "content"}:
                raise TemplateError(
                    f"message {i} must be a dict with exactly the keys 'role' and 'content', got {msg!r}"
                )
            role, content = msg["role"], msg["content"]
            if role not in _ROLES:
                raise TemplateError(f"message {i} has role {role!r}; valid roles: {', '.join(_ROLES)}")
            if not isinstance(content, str):
                raise TemplateError(f"message {i} content must be a string, got {type(content).__name__}")
            if role == "assistant" and i != len(messages) - 1:
                raise TemplateError(
                    f"message {i} is an assistant message before the end: only the last message may be "
                    "an assistant prefill"
                )
            _placeholders(content)
            parsed.append((role, content))
        object.__setattr__(self, "messages", tuple(parsed))

    @property
    def prefill(self) -> str:
        """The assistant prefill (text the answer starts with), or ``""`` when there is none."""
        role, content = self.messages[-1]
        return content if role == "assistant" else ""

    @property
    def placeholders(self) -> frozenset[str]:
        """Every column name the template uses."""
        return frozenset(name for _, content in self.messages for name in _placeholders(content))

    def as_dicts(self) -> list[dict[str, str]]:
        """The raw template as a list of role/content dicts."""
        return [{"role": role, "content": content} for role, content in self.messages]

    def validate_columns(self, columns: Sequence[str]) -> None:
        """Check every placeholder names one of ``columns``.

        Raises:
            TemplateError: naming the unknown placeholder and the available columns.
        """
        missing = sorted(self.placeholders - set(columns))
        if missing:
            raise TemplateError(
                f"template placeholder {{{missing[0]}}} is not a column of the problems; "
                f"available columns: {', '.join(sorted(columns))}"
            )

    def render(self, problem: Mapping[str, Any]) -> list[dict[str, str]]:
        """Fill the placeholders with one problem's columns.

        Args:
            problem: Column name to value.

        Returns:
            The conversation as role/content dicts (the prefill, if any, is the last message).

        Raises:
            TemplateError: if a placeholder names a column the problem lacks.
        """
        self.validate_columns(list(problem))
        values = {name: format_value(problem[name]) for name in self.placeholders}
        return [{"role": role, "content": content.format(**values)} for role, content in self.messages]

    def render_text(self, problem: Mapping[str, Any], tokenizer: Any) -> str:
        """The prompt string from the tokenizer's chat template.

        With a prefill the final assistant message is continued (no end-of-turn token after it);
        without one the generation prompt for the assistant is added.

        Args:
            problem: Column name to value.
            tokenizer: A Hugging Face tokenizer with a chat template.

        Returns:
            The prompt text the model continues.
        """
        messages = self.render(problem)
        if self.prefill:
            return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
