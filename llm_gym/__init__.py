"""llm-gym: reasoning problems as Gymnasium environments for language models.

``import llm_gym`` registers every task (``gym.make("llm_gym/Countdown-v0")``) and stays light:
torch and transformers are imported only by the parts that need them.
"""

from typing import Any

from llm_gym.env import ReasoningEnv
from llm_gym.registry import get_task, list_envs, register_task
from llm_gym.rubric import Rubric, Score
from llm_gym.task import Task
from llm_gym.template import ConversationTemplate, TemplateError

__version__ = "0.1.0"

__all__ = [
    "ConversationTemplate",
    "ReasoningEnv",
    "ReasoningGym",
    "Rubric",
    "Score",
    "Task",
    "TemplateError",
    "get_task",
    "list_envs",
    "register_task",
]


def __getattr__(name: str) -> Any:  # ReasoningGym pulls in torch: import it on first use only
    """Import :class:`~llm_gym.reasoning_gym.ReasoningGym` (and torch) on first access only."""
    if name == "ReasoningGym":
        from llm_gym.reasoning_gym import ReasoningGym

        return ReasoningGym
    raise AttributeError(f"module 'llm_gym' has no attribute {name!r}")


from llm_gym import tasks as _tasks  # noqa: E402,F401  (registers the environments)
