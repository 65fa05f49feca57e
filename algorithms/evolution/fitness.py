"""Fitness that can rank agents: exact accuracy, ties broken by the total reward.

A greedy total reward saturates at its format part once every agent answers in the format (the
demo's fitness was 1.000 for every agent from step 10 on), so selection could not tell agents
apart. :func:`accuracy_fitness` ranks by exact accuracy first; between agents of equal accuracy the
higher mean total reward wins. Accuracy over ``N`` problems moves in steps of ``1 / N``; the
tie-break term is below ``1 / (N + 1)``, so it never outweighs one more solved problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["FITNESS_METRICS", "accuracy_fitness", "fitness_of"]

FITNESS_METRICS = ("reward", "accuracy")
"""``"reward"``: the mean total reward (AgileRL's fitness); ``"accuracy"``: :func:`accuracy_fitness`."""


def accuracy_fitness(metrics: Mapping[str, float], max_reward: float) -> float:
    """Exact accuracy plus a tie-break by total reward that never outweighs one solved problem.

    ``accuracy + (reward / max_reward) / (problems + 1)`` with the reward clamped to ``[0, max_reward]``.

    Args:
        metrics: An evaluation's metrics (``accuracy``, ``reward/total``, ``problems``).
        max_reward: The largest total reward a completion can score (``env.rubric.max_total``).

    Returns:
        The fitness; the mean total reward when the metrics have no ``accuracy`` (an env without a
        correct part), NaN when they have neither.

    Raises:
        ValueError: If ``max_reward <= 0``.

    Example:
        >>> round(accuracy_fitness({"accuracy": 0.5, "reward/total": 1.0, "problems": 4}, 2.0), 6)
        0.6
    """
    if max_reward <= 0:
        raise ValueError(f"max_reward={max_reward} must be > 0 (the rubric's max_total)")
    reward = float(metrics.get("reward/total", math.nan))
    if "accuracy" not in metrics:
        return reward
    problems = max(float(metrics.get("problems", 1.0)), 1.0)
    tie = 0.0 if math.isnan(reward) else min(max(reward / max_reward, 0.0), 1.0)
    return float(metrics["accuracy"]) + tie / (problems + 1.0)


def fitness_of(metrics: Mapping[str, float], fitness: str, max_reward: float | None) -> float:
    """The fitness named ``fitness`` (one of :data:`FITNESS_METRICS`) of an evaluation's metrics.

    Raises:
        ValueError: On an unknown name, or ``"accuracy"`` without a ``max_reward``.
    """
    if fitness == "reward":
        return float(metrics.get("reward/total", math.nan))
    if fitness != "accuracy":
        raise ValueError(f"unknown fitness {fitness!r}; valid: {list(FITNESS_METRICS)}")
    if max_reward is None:
        raise ValueError("fitness='accuracy' needs the env's max_reward (env.rubric.max_total) for its tie-break")
    return accuracy_fitness(metrics, max_reward)
