"""Held-out evaluation of an agent: every test problem once, in a fixed order.

Fitness is measured on the same fixed problems for every agent and every evaluation, so agents are
compared on equal terms, and the env's training position is untouched (ReasoningGym keeps a pending
batch per split).
"""

from __future__ import annotations

from typing import Any

__all__ = ["held_out_metrics"]


def held_out_metrics(agent: Any, env: Any, max_problems: int | None = None, *, greedy: bool = True) -> dict[str, float]:
    """Mean rewards of ``agent`` on the env's test split.

    Args:
        agent: An agent with ``get_action(prompts, training=...)`` (a GRPO agent).
        env: A :class:`~llm_gym.reasoning_gym.ReasoningGym` (``eval_mode``, ``reset``, ``step``,
            ``score``, ``last_metrics``, ``num_problems``).
        max_problems: Evaluate the first this-many problems (rounded up to whole batches); default all.
        greedy: One greedy completion per problem (fitness). ``False`` samples the agent's
            ``group_size`` completions per problem with its sampling settings: the policy's expected
            reward, which moves smoothly where the greedy output of a small model flips for every
            problem at once.

    Returns:
        ``reward/total``, ``reward/<part>``, ``accuracy`` (when the env knows the correct part): means
        over every scored completion; ``reward/failures``: reward functions that failed (a count);
        ``problems``: how many problems were answered.
    """
    total = env.num_problems("test")
    if max_problems is not None:
        total = min(total, max_problems)
    sums: dict[str, float] = {}
    seen = 0
    with env.eval_mode():
        prompts = env.reset(reset_dataloaders=True)
        while True:
            completions, _ = agent.get_action(prompts, training=not greedy)
            seen += len(prompts)
            done = seen >= total
            if done:
                env.score(completions)  # the last batch: score it without drawing another
            else:
                prompts_next, _ = env.step(completions)
            for key, value in env.last_metrics().items():
                sums[key] = sums.get(key, 0.0) + value * (1.0 if key == "reward/failures" else len(completions))
            if done:
                break
            prompts = prompts_next
    metrics = {k: (v if k == "reward/failures" else v / seen) for k, v in sums.items()}
    metrics["problems"] = float(seen)
    return metrics
