"""llm_gym.console: the commands' one way to the terminal, and no ``print`` anywhere else in the library."""

from __future__ import annotations

import ast
import doctest
from pathlib import Path

import llm_gym.console as console

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ("llm_gym", "algorithms", "tasks")


def test_emit_writes_stdout_and_fail_writes_stderr_and_returns_the_status(capsys):
    console.emit("a | b\n--+--")
    console.emit()
    assert console.fail("sft", "--lr 0: give a positive learning rate") == 2
    assert console.fail("eval", "every request failed", status=1) == 1
    out, err = capsys.readouterr()
    assert out == "a | b\n--+--\n\n"
    assert err == "llm-gym sft: --lr 0: give a positive learning rate\nllm-gym eval: every request failed\n"


def test_console_doctest():
    assert doctest.testmod(console).failed == 0


def test_the_library_never_calls_print():
    calls = []
    for package in LIBRARY:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            calls += [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(tree)
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]  # fmt: skip
    assert calls == [], "log with logging.getLogger(__name__); commands write through llm_gym.console"
