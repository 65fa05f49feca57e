"""Registration of llm_gym environments with Gymnasium.

Two kinds of environment live under the ``llm_gym/`` namespace:

* **Task environments**, one problem per episode, declared as a :class:`~llm_gym.task.Task` and
  registered with :func:`register_task` (``llm_gym/Countdown-v0``). The spec holds the task as a
  string reference, ``"<module>:<name>"`` (e.g. ``"llm_gym.tasks.countdown:TASK"``), the way
  Gymnasium's own specs hold their entry points.
* **Custom environments**, an ``Env`` class of their own such as the multi-turn TicTacToe game,
  registered with :func:`register_env` under a string entry point and JSON-able kwargs.

Either way nothing heavy is imported before ``gym.make`` and ``gym.spec(id).to_json()`` works.
"""

from __future__ import annotations

import difflib
import importlib
import json
import sys
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
from gymnasium.envs.registration import load_env_creator

from llm_gym.task import Task

__all__ = [
    "NAMESPACE", "env_description", "get_task", "list_envs", "list_task_envs", "load_task", "register_env",
    "register_task",
]

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


def register_env(env_id: str, entry_point: str, *, kwargs: Mapping[str, Any] | None = None) -> None:
    """Register a custom environment class (for example a multi-turn game) under ``llm_gym/``.

    Args:
        env_id: ``llm_gym/<Name>-v<N>``.
        entry_point: ``"module:Class"`` of a ``gymnasium.Env``; imported only by ``gym.make``.
        kwargs: Default constructor arguments; JSON values only, so the spec serialises.

    Raises:
        ValueError: if the id is outside the ``llm_gym/`` namespace or ``entry_point`` is not a
            ``"module:Class"`` string.
        TypeError: if a kwarg is not JSON-serialisable.
    """
    if not env_id.startswith(f"{NAMESPACE}/"):
        raise ValueError(f"env id {env_id!r} must start with '{NAMESPACE}/', e.g. '{NAMESPACE}/TicTacToe-v0'")
    if not isinstance(entry_point, str) or ":" not in entry_point:
        raise ValueError(f"entry_point must be a 'module:Class' string, got {entry_point!r}")
    kwargs = dict(kwargs or {})
    try:
        json.dumps(kwargs)
    except TypeError as err:
        raise TypeError(
            f"{env_id}: registration kwargs must be JSON values (pass objects to gym.make instead): {err}"
        ) from None
    gym.register(id=env_id, entry_point=entry_point, kwargs=kwargs)


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


def list_task_envs() -> list[str]:
    """The registered ``llm_gym/*`` ids that are built from a :class:`Task` (see :func:`get_task`), sorted."""
    return [env_id for env_id in list_envs() if "task" in gym.spec(env_id).kwargs]


def _spec(env_id: str) -> gym.envs.registration.EnvSpec:
    if "/" not in env_id:
        env_id = f"{NAMESPACE}/{env_id}"
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list_envs(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise gym.error.Error(f"no environment {env_id!r} is registered.{hint} Registered: {', '.join(list_envs())}")
    return gym.spec(env_id)


def get_task(env_id: str) -> Task:
    """The :class:`Task` behind a registered id (the ``llm_gym/`` prefix may be left out).

    Raises:
        gymnasium.error.Error: for an unknown id, suggesting the nearest registered ones, or for
            a custom environment that has no task.
    """
    spec = _spec(env_id)
    task = spec.kwargs.get("task")
    if task is None:
        raise gym.error.Error(f"{spec.id} is not an llm_gym task environment")
    return load_task(task)


def env_description(env_id: str) -> str:
    """One line describing a registered environment, for listings.

    A task's ``description``; for a custom environment, its class's ``description`` attribute
    (or the first line of its docstring).

    Raises:
        gymnasium.error.Error: for an unknown id, suggesting the nearest registered ones.
    """
    spec = _spec(env_id)
    if "task" in spec.kwargs:
        return get_task(spec.id).description
    creator = load_env_creator(spec.entry_point) if isinstance(spec.entry_point, str) else spec.entry_point
    text = getattr(creator, "description", None) or (creator.__doc__ or "").strip()
    return text.splitlines()[0] if text else ""
