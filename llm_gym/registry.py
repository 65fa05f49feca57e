"""Registration of llm_gym tasks as Gymnasium environments."""

from __future__ import annotations

import difflib

import gymnasium as gym

from llm_gym.task import Task

__all__ = ["register_task", "list_envs", "get_task", "NAMESPACE"]

NAMESPACE = "llm_gym"


def register_task(task: Task) -> None:
    """Register ``task`` as ``llm_gym/<name>-v<version>``.

    The entry point is a string, so nothing beyond the task module is imported until
    ``gym.make`` is called.
    """
    gym.register(id=task.env_id, entry_point="llm_gym.env:ReasoningEnv", kwargs={"task": task})


def list_envs() -> list[str]:
    """Every registered ``llm_gym/*`` environment id, sorted."""
    return sorted(env_id for env_id in gym.registry if env_id.startswith(f"{NAMESPACE}/"))


def get_task(env_id: str) -> Task:
    """The :class:`Task` behind a registered id (the ``llm_gym/`` prefix may be left out).

    Raises:
        gymnasium.error.Error: for an unknown id, suggesting the nearest registered ones.
    """
    if "/" not in env_id:
        env_id = f"{NAMESPACE}/{env_id}"
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list_envs(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise gym.error.Error(f"no environment {env_id!r} is registered.{hint} Registered: {', '.join(list_envs())}")
    task = gym.spec(env_id).kwargs.get("task")
    if not isinstance(task, Task):
        raise gym.error.Error(f"{env_id} is not an llm_gym task environment")
    return task
