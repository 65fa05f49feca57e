"""Scripted OpenAI-compatible servers for the endpoint tests: correct answers, wrong ones and injected faults.

The script is keyed on the problem a request asks about (its user message), and on how many times that
problem has been asked, so the faults land on the same problems whatever order concurrent requests arrive in.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from llm_gym.chat_server import ChatServer, Reply, completion_body
from llm_gym.env import build_problems
from llm_gym.registry import get_task

TASK = "llm_gym/Subtraction-v0"
MODEL = "scripted"
TOKENS = 7  # completion tokens every scripted answer reports


def problems(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first ``n`` test problems of TASK, as ``llm-gym eval -n n --seed seed`` builds them."""
    ps = build_problems(get_task(TASK), split="test", size=n, seed=seed)
    return [ps[i] for i in range(n)]


def right(problem: Mapping[str, Any]) -> str:
    """The oracle's answer."""
    return get_task(TASK).solve(problem)


def wrong(problem: Mapping[str, Any]) -> str:
    """Well formatted, wrong by one."""
    return f" guess </think>\n<answer>{problem['answer'] + 1}</answer>"


Script = Callable[[int, int], Reply | str]  # (problem index, attempt number from 1) -> a fault or an answer text


class ScriptedServer(ChatServer):
    """A ChatServer answering TASK's first ``n`` problems as ``script(problem, attempt)`` says.

    Attributes:
        asked: Requests per problem index (attempts included).
    """

    def __init__(self, n: int, script: Script, delay: float = 0.0) -> None:
        self.rows = problems(n)
        self.by_question = {row["question"]: i for i, row in enumerate(self.rows)}
        self.asked: Counter[int] = Counter()
        self.bodies: list[dict[str, Any]] = []
        self.delay = delay
        self._count_lock = threading.Lock()
        super().__init__(self._respond, MODEL)
        self.script = script

    def _respond(self, body: Mapping[str, Any]) -> Reply:
        question = next(m["content"] for m in body["messages"] if m["role"] == "user")
        i = self.by_question[question]
        with self._count_lock:
            self.bodies.append(dict(body))
            self.asked[i] += 1
            attempt = self.asked[i]
        out = self.script(i, attempt)
        if isinstance(out, Reply):
            return out
        return Reply(body=completion_body(MODEL, out, 10, TOKENS), delay=self.delay)
