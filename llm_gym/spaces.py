"""Gymnasium spaces for conversations: text and role/content messages."""

from __future__ import annotations

from gymnasium import spaces

__all__ = ["CHARSET", "text_space", "messages_space"]

# Every character a prompt or a completion may hold: tab, newlines and the printable part of the
# Basic Multilingual Plane (no C0/C1 controls, no surrogates). Gymnasium's default Text charset is
# alphanumeric only, which would reject any real prompt.
CHARSET = "\t\n\r" + "".join(
    chr(c) for c in range(0x20, 0x10000) if not (0x7F <= c < 0xA0 or 0xD800 <= c < 0xE000)
)


def text_space(max_length: int) -> spaces.Text:
    """A Text space over :data:`CHARSET` of at most ``max_length`` characters."""
    return spaces.Text(max_length=max_length, min_length=0, charset=CHARSET)


def messages_space(max_length: int) -> spaces.Sequence:
    """A sequence of ``{"role", "content"}`` messages, as a tuple of dicts."""
    return spaces.Sequence(
        spaces.Dict({"role": spaces.Text(max_length=9, min_length=4, charset="abcdefghijklmnopqrstuvwxyz"),
                     "content": text_space(max_length)})
    )
