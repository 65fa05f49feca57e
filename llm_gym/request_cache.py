"""A disk cache of chat-completion answers, so a repeated evaluation asks the endpoint nothing.

The key is a hash of everything that determines the answer's distribution: the base URL, the
model, the messages, the sampling parameters and the sample's index (the ``R`` samples of one
problem are different draws, so each has its own entry). Only answers are cached, never failures.
Each entry is one small JSON file written atomically (temp file + rename), so concurrent writers
and kills never leave a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["RequestCache", "default_cache_dir", "request_key"]


def default_cache_dir() -> Path:
    """``$LLM_GYM_CACHE/requests``, or ``~/.cache/llm_gym/requests``."""
    root = Path(os.environ["LLM_GYM_CACHE"]) if os.environ.get("LLM_GYM_CACHE") else Path.home() / ".cache" / "llm_gym"
    return root / "requests"


def request_key(
    base_url: str, model: str, messages: Sequence[Mapping[str, str]], sampling: Mapping[str, Any], sample: int
) -> str:
    """The cache key (sha256 hex) of one request.

    >>> a = request_key("http://h/v1", "m", [{"role": "user", "content": "hi"}], {"temperature": 1.0}, 0)
    >>> a == request_key("http://h/v1/", "m", [{"role": "user", "content": "hi"}], {"temperature": 1.0}, 0)
    True
    >>> a == request_key("http://h/v1", "m", [{"role": "user", "content": "hi"}], {"temperature": 1.0}, 1)
    False
    """
    payload = [base_url.rstrip("/"), model, [dict(m) for m in messages], dict(sorted(sampling.items())), sample]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class RequestCache:
    """Answers by :func:`request_key`, one JSON file each.

    Args:
        folder: The cache folder (created on the first write).
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.hits = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached answer (``{"text", "completion_tokens"}``) or ``None``."""
        path = self._path(key)
        try:
            value = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        """Store an answer."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{id(value)}")
        tmp.write_text(json.dumps(dict(value), ensure_ascii=False))
        tmp.replace(path)
