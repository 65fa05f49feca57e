"""Registration of llm_gym tasks as Gymnasium environments.

A registered spec holds the task as a string reference, ``"<module>:<name>"`` (the module-level
name it is bound to, e.g. ``"llm_gym.tasks.countdown:TASK"``), the way Gymnasium's own specs hold
their entry points, so ``gym.spec(env_id).to_json()`` works and the task module is imported only
when the env is made.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Any

import gymnasium as gym

from llm_gym.task import Task

__all__ = ["register_task", "list_envs", "get_task", "load_task", "NAMESPACE"]

NAMESPACE = "llm_gym"


def _reference(task: Task, namespace: dict[str, Any]) -> str | Task:
    """``"<module>:<name>"`` of ``task`` in ``namespace`` (a module's globals), else the task itself."""
    for name, value in namespace.items():
        if value is task and not name.startswith("_"):
            return f"{namespace['__name__']}:{name}"
    return task


def register_task(task: Task) -> None:
    """Register ``task`` as ``llm_gym/<name>-v<version>``.

    Call it at module level with the task bound to a module-level name (``TASK = Task(...)``,
    ``register_task(TASK)``): the spec then refers to it as ``"<module>:TASK"`` and serialises
    (``gym.spec(env_id).to_json()``). A task not bound in the caller's module is held as the object
    itself (it works in this process, but its spec cannot be written as JSON).
    """
    caller = sys._getframe(1).f_globals
    gym.register(id=task.env_id, entry_point="llm_gym.env:ReasoningEnv", kwargs={"task": _reference(task, caller)})


def load_task(task: Task | str) -> Task:
    """The :class:`Task` a spec refers to: ``"<module>:<name>"`` is imported, a Task is returned as is.

    Raises:
        gymnasium.error.Error: If the reference does not name a Task.
    """
    if isinstance(task, Task):
        return task
    module, _, name = str(task).partition(":")
    value = getattr(importlib.import_module(module), name, None) if module and name else None
    if not isinstance(value, Task):
        raise gym.error.Error(f"task reference {task!r} must be '<module>:<name>' of a llm_gym Task")
    return value


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
    if task is None:
        raise gym.error.Error(f"{env_id} is not an llm_gym task environment")
    return load_task(task)
