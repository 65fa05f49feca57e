"""Built-in tasks, one module each; importing this package registers them all."""

from llm_gym.tasks import countdown, subtraction, tictactoe  # noqa: F401

__all__ = ["countdown", "subtraction", "tictactoe"]
