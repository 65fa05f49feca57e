"""Bad user input: one error type that the command line prints as one line, and the checks that raise it.

A :class:`UsageError` says what value is wrong and how to fix it; ``llm-gym`` prints it as
``llm-gym <command>: <message>`` and exits with status 2, without a traceback (``--debug`` or
``LLM_GYM_DEBUG=1`` shows one). Library code raises it where the cause is the caller's input
(a path that does not exist, a config value of the wrong type), so API users get the same message.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["MissingColumnError", "UsageError", "check_field_types", "check_model_source", "looks_like_path"]


class UsageError(ValueError):
    """A bad input: the message names the value, the rule and the fix."""


class MissingColumnError(UsageError, KeyError):
    """A dataset lacks a column the task needs (a ``KeyError`` too, for code that catches that)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``org/name``).

    A hub id has at most one ``/`` and does not start with ``/``, ``.`` or ``~``.

    >>> looks_like_path("Qwen/Qwen2.5-0.5B"), looks_like_path("/data/model"), looks_like_path("runs/x/sft")
    (False, True, True)
    """
    text = str(name)
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text


def check_model_source(name: str, flag: str = "--model") -> None:
    """Refuse a model that is meant as a local path but is no model folder.

    Args:
        name: A local folder or a hub id.
        flag: How the caller names the setting, for the message.

    Raises:
        UsageError: when ``name`` is a path that does not exist, is not a folder, or has no
            ``config.json`` / ``adapter_config.json``.
    """
    path = Path(name).expanduser()
    if not path.exists():
        if looks_like_path(name):
            raise UsageError(f"{flag} {name}: no such folder; give a local model folder (with config.json) or a hub id "
                             "such as Qwen/Qwen2.5-0.5B-Instruct")  # fmt: skip
        return  # a hub id: transformers reports a missing one (offline: no network here)
    if not path.is_dir():
        raise UsageError(f"{flag} {name} is a file; give the model's folder (it holds config.json)")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise UsageError(f"{flag} {name} holds no config.json (nor adapter_config.json): give a model folder written "
                         "by save_pretrained, an elite folder of a run, or a hub id")  # fmt: skip


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type (ints are not bools; an int is a valid float)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if origin is not None:
        return isinstance(value, origin)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


_KIND = {int: "a whole number such as 4", float: "a number such as 0.001", str: "a string", bool: "true or false",
         dict: "a mapping such as {key: value}", list: "a list"}  # fmt: skip


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        text = " or ".join(_describe(a) for a in arms)
        return f"{text} (or null)" if len(arms) < len(typing.get_args(hint)) else text
    return _KIND.get(typing.get_origin(hint) or hint, getattr(hint, "__name__", str(hint)))


def check_field_types(config: Any) -> None:
    """Check every field of a dataclass instance against its annotation.

    ``int`` fields take ints only (not ``2.5``, ``"4"`` or ``True``); ``float`` fields take ints and
    floats; ``X | None`` fields take None too; containers are checked by their outer type.

    Args:
        config: A dataclass instance (annotations may be strings: ``from __future__ import annotations``).

    Raises:
        UsageError: naming the first field of the wrong type, its value and what it must be.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints.get(f.name, Any)):
            quoted = " (unquoted in YAML)" if isinstance(value, str) else ""
            raise UsageError(f"{type(config).__name__}.{f.name}={value!r} must be {_describe(hints[f.name])}{quoted}")
