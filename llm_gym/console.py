"""What the ``llm-gym`` commands write to the terminal: results on stdout, failures on stderr.

The library itself never writes to the terminal: it logs through ``logging.getLogger(__name__)``.
The command modules (:mod:`llm_gym.cli`, :mod:`llm_gym.eval_command`, :mod:`llm_gym.data_command`,
:mod:`llm_gym.sft_command`) write their results and usage errors through these functions only, so
there is one place that decides where command output goes.
"""

from __future__ import annotations

import sys

__all__ = ["emit", "error", "fail"]

USAGE_EXIT = 2
"""Exit status of a command given bad input (argparse's own)."""


def emit(text: str = "") -> None:
    """Write one result line (or block) to stdout, newline-terminated.

    Args:
        text: The text; a table may span several lines.
    """
    sys.stdout.write(f"{text}\n")


def error(text: str) -> None:
    """Write one line to stderr, newline-terminated.

    Args:
        text: The message, already prefixed with the command (``llm-gym eval: ...``).
    """
    sys.stderr.write(f"{text}\n")


def fail(command: str, message: str, status: int = USAGE_EXIT) -> int:
    """Report a usage error of ``llm-gym <command>`` on stderr and return the exit status.

    Args:
        command: The subcommand (``"data"``, ``"sft"``, ...).
        message: What is wrong and how to fix it.
        status: The exit status to return.

    Returns:
        ``status``, for ``return fail(...)`` in a command body.

    >>> import contextlib, io
    >>> with contextlib.redirect_stderr(io.StringIO()) as err:
    ...     status = fail("data", "--seq-len 0: give a positive number of tokens")
    >>> status, err.getvalue()
    (2, 'llm-gym data: --seq-len 0: give a positive number of tokens\\n')
    """
    error(f"llm-gym {command}: {message}")
    return status
