"""Gymnasium spaces for conversations: text and role/content messages."""

from __future__ import annotations

import copy
import functools

from gymnasium import spaces

__all__ = ["CHARSET", "text_space", "messages_space"]

# Every character a prompt or a completion may hold: tab, newlines and the printable part of the
# Basic Multilingual Plane (no C0/C1 controls, no surrogates). Gymnasium's default Text charset is
# alphanumeric only, which would reject any real prompt.
CHARSET = "\t\n\r" + "".join(
    chr(c) for c in range(0x20, 0x10000) if not (0x7F <= c < 0xA0 or 0xD800 <= c < 0xE000)
)

_ROLE_CHARSET = "abcdefghijklmnopqrstuvwxyz"


@functools.lru_cache(maxsize=32)
def _text_prototype(max_length: int, min_length: int, charset: str) -> spaces.Text:
    # Building a Text space over ~63k characters indexes the charset (a frozenset, a tuple, a dict
    # and a sorted string: ~40 ms). The prototype is never sampled and its tables are immutable,
    # so shallow copies share them and each copy still gets its own random generator.
    return spaces.Text(max_length=max_length, min_length=min_length, charset=charset)


def text_space(max_length: int) -> spaces.Text:
    """A Text space over :data:`CHARSET` of at most ``max_length`` characters.

    Args:
        max_length: Longest text the space holds.

    Returns:
        A fresh space (its own random generator); building one costs microseconds.
    """
    return copy.copy(_text_prototype(max_length, 0, CHARSET))


def messages_space(max_length: int) -> spaces.Sequence:
    """A sequence of ``{"role", "content"}`` messages, as a tuple of dicts.

    Args:
        max_length: Longest message content, in characters.

    Returns:
        The space of conversations.
    """
    role = copy.copy(_text_prototype(9, 4, _ROLE_CHARSET))
    return spaces.Sequence(spaces.Dict({"role": role, "content": text_space(max_length)}))
