"""Built-in tasks, one module each; importing this package registers them all."""

from llm_gym.tasks import countdown, gsm8k, rg, subtraction, tictactoe, zebra  # noqa: F401

__all__ = ["countdown", "gsm8k", "rg", "subtraction", "tictactoe", "zebra"]
