"""A population's generation, rollouts and held-out evaluation as one batched decode over every agent.

The agents of a population are LoRA adapters of one shared PEFT model. Generating for them one
after another reads the base weights once per agent and decoding step; :func:`population_generate`
decodes every agent's rows together (:func:`~llm_gym.algorithms.rollout.population_decode.decode_population`:
one base matmul per layer, each row's LoRA delta from its own adapter, each agent's own sampling
settings). The completions are the same per-prompt tensors each agent's ``get_action`` returns, so
scoring and the (per-agent) update do not change:

    prompts --population_generate--> per agent (ids, masks) --env.score--> per agent Rollout --agent.learn

It applies when every agent uses the ``"hf"`` backend's lean loop on the SAME model object and the
model's adapters are plain LoRA. When the agents instead share one backend that serves several
adapters at once (a vLLM engine or server, :func:`shared_backend`), the whole population is ONE
``generate_batches`` call: per prompt its agent's LoRA request and sampling settings. Otherwise
(and for a single agent, whose merged-weight path is faster) every agent generates with its own
``get_action``, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from llm_gym.algorithms.rollout.backend import AdapterBatch
from llm_gym.algorithms.rollout.completions import left_pad, split_completions
from llm_gym.algorithms.rollout.hf import HFGenerationBackend
from llm_gym.algorithms.rollout.multi_turn import MultiTurnEnv
from llm_gym.algorithms.rollout.population_decode import (
    DecodeRequest,
    decode_population,
    supports_row_adapters,
)
from llm_gym.algorithms.rollout.rollout import Rollout, evaluate_with, rollout

__all__ = [
    "MAX_ROWS",
    "batched_population",
    "evaluate_population",
    "population_generate",
    "population_rollouts",
    "shared_backend",
]

logger = logging.getLogger(__name__)


def shared_backend(agents: Sequence[Any]) -> Any | None:
    """The one backend that serves every agent's adapter in a single call, if there is one.

    Args:
        agents: GRPO agents.

    Returns:
        The backend, for two or more agents with distinct adapters of one shared model that all hold
        the SAME backend object with a ``generate_batches`` method (the vLLM backends: clones share
        their engine); else None.
    """
    if len(agents) < 2 or not all(hasattr(a, "prepare_generation") for a in agents):
        return None
    backend = getattr(agents[0], "backend", None)
    if not callable(getattr(backend, "generate_batches", None)):
        return None
    if any(a.backend is not backend or a.model is not agents[0].model for a in agents):
        return None
    names = [a.adapter_name for a in agents]
    return backend if len(set(names)) == len(names) else None


def batched_population(agents: Sequence[Any]) -> bool:
    """Whether ``agents`` can generate together (:func:`population_generate`).

    Args:
        agents: GRPO agents.

    Returns:
        True for two or more agents with distinct adapters of one shared model, either all on one
        shared multi-adapter backend (:func:`shared_backend`), or each on the lean ``"hf"`` backend
        with the same pad and EOS ids and only plain LoRA layers in the model (one batched decode).
    """
    if len(agents) < 2 or not all(hasattr(a, "prepare_generation") for a in agents):
        return False
    if shared_backend(agents) is not None:
        return True
    model = getattr(agents[0], "model", None)
    names = [getattr(a, "adapter_name", None) for a in agents]
    for agent in agents:
        backend = getattr(agent, "backend", None)
        if agent.model is not model or not isinstance(backend, HFGenerationBackend) or backend.model is not model:
            return False
        if backend.use_generate or agent.pad_token_id != agents[0].pad_token_id:
            return False
        if list(agent.eos_token_ids) != list(agents[0].eos_token_ids):
            return False
    return len(set(names)) == len(names) and supports_row_adapters(model, names)


MAX_ROWS = 128
"""Default cap on the rows (prompts x group size, summed over agents) of one batched decode. Measured on the
``small`` preset (1 CPU thread, 128 tokens): 4 agents x 32 rows in one decode took 3.8x one agent's
generation, 8 x 32 rows 9.1x (more than 8 decodes one by one; likely cause: each step where rows finish
copied the ~630 MB KV cache to compact it; compaction is now in place, ``kv_cache.PreallocatedLayer``), on a loaded host, and the 8-agent KV cache raised the peak memory to 1.42x one agent. Consecutive agents are decoded
together up to this many rows; an agent with more rows is decoded alone."""


def _chunks(rows: Sequence[int], max_rows: int | None) -> list[list[int]]:
    """Consecutive indices grouped so that each group's rows sum to at most ``max_rows`` (None: one group)."""
    if max_rows is None:
        return [list(range(len(rows)))]
    groups: list[list[int]] = []
    total = 0
    for i, count in enumerate(rows):
        if groups and total + count <= max_rows:
            groups[-1].append(i)
            total += count
        else:
            groups.append([i])
            total = count
    return groups


def population_generate(
    agents: Sequence[Any], prompts: Sequence[dict[str, Any]], *, training: bool = True, max_rows: int | None = MAX_ROWS
) -> list[tuple[list[Tensor], list[Tensor]]]:
    """Every agent's completions for the same prompts, in one batched decode when possible.

    Args:
        agents: GRPO agents (see :func:`batched_population`; others generate one by one). Agents
            sharing a multi-adapter backend (:func:`shared_backend`) are served by one call of it.
        prompts: The environment's prompts.
        training: Sample with each agent's settings (its group size, budget, temperature, top-p,
            top-k); False: one greedy completion per prompt (evaluation).
        max_rows: At most this many rows per batched decode (see :data:`MAX_ROWS`); None: all agents at once.

    Returns:
        Per agent ``(completion_ids, action_masks)``, exactly what its ``get_action`` returns.

    Raises:
        ValueError: On no prompts or malformed ones.
    """
    if not batched_population(agents):
        return [agent.get_action(prompts, training=training) for agent in agents]
    backend = shared_backend(agents)
    if backend is not None:
        return _one_call(backend, agents, prompts, training)
    first = agents[0]
    samplings = [agent.prepare_generation(prompts, training) for agent in agents]
    input_ids, attention, unpadded = left_pad(prompts, first.pad_token_id)
    model = first.model
    device = next(model.parameters()).device
    input_ids, attention = input_ids.to(device), attention.to(device)
    requests = [DecodeRequest(a.adapter_name, input_ids, attention, s) for a, s in zip(agents, samplings, strict=True)]
    was_training = model.training
    model.eval()  # no dropout while sampling
    generated: list[Tensor] = []
    try:
        with torch.no_grad():
            for chunk in _chunks([len(prompts) * s.group_size for s in samplings], max_rows):
                generated.extend(decode_population(
                    model, [requests[i] for i in chunk], eos_token_ids=first.eos_token_ids,
                    pad_token_id=first.pad_token_id, preallocate_cache=first.backend.preallocate_cache,
                ))  # fmt: skip
    finally:
        model.train(was_training)
    out = []
    for ids, sampling in zip(generated, samplings, strict=True):
        split = split_completions(unpadded, ids, sampling.group_size, eos_token_ids=first.eos_token_ids,
                                  pad_token_id=first.pad_token_id)  # fmt: skip
        out.append((split.completion_ids, split.action_masks))
    return out


def _one_call(
    backend: Any, agents: Sequence[Any], prompts: Sequence[dict[str, Any]], training: bool
) -> list[tuple[list[Tensor], list[Tensor]]]:
    """Every agent's completions from ONE ``backend.generate_batches`` call (per prompt its agent's adapter)."""
    samplings = [agent.prepare_generation(prompts, training) for agent in agents]  # syncs changed adapters
    batches = [AdapterBatch(a.adapter_name, prompts, s) for a, s in zip(agents, samplings, strict=True)]
    outputs = backend.generate_batches(batches)
    logps = getattr(backend, "last_logprobs", None)
    out = []
    for i, (agent, generated) in enumerate(zip(agents, outputs, strict=True)):
        if training and logps is not None:
            agent.remember_sampling_logps(generated.completion_ids, logps[i])
        out.append((generated.completion_ids, generated.action_masks))
    return out


class _Generated:
    """A policy that answers with completions generated beforehand (so :func:`rollout` scores them)."""

    def __init__(self, completions: list[Tensor], masks: list[Tensor]) -> None:
        self.completions, self.masks = completions, masks

    def get_action(self, prompts: Sequence[dict[str, Any]], training: bool = True) -> tuple[list[Tensor], list[Tensor]]:
        return self.completions, self.masks


def population_rollouts(
    agents: Sequence[Any], env: Any, prompts: Sequence[dict[str, Any]], *, training: bool = True
) -> list[Rollout] | None:
    """Every agent's scored rollout on the env's pending batch, generated in one batched decode.

    Args:
        agents: GRPO agents.
        env: A single-turn batched env (``score``, ``last_metrics``); its batch stays pending.
        prompts: The batch ``env.reset()`` returned.
        training: As in :func:`population_generate`.

    Returns:
        One :class:`~llm_gym.algorithms.rollout.rollout.Rollout` per agent, or None when the agents
        cannot be batched (:func:`batched_population`) or the env is multi-turn: then roll out each
        agent on its own (:func:`~llm_gym.algorithms.rollout.rollout.rollout`).
    """
    if isinstance(env, MultiTurnEnv) or not batched_population(agents):
        return None
    generated = population_generate(agents, prompts, training=training)
    return [rollout(_Generated(ids, masks), env, prompts, training=training) for ids, masks in generated]


def evaluate_population(
    agents: Sequence[Any], env: Any, max_problems: int | None = None, *, split: str = "test", greedy: bool = True
) -> list[dict[str, float]]:
    """Held-out metrics of every agent (what :func:`~llm_gym.algorithms.rollout.rollout.evaluate` gives
    each one), with each batch of problems generated for all agents in one batched decode.

    Args:
        agents: GRPO agents; when they cannot be batched each is evaluated on its own.
        env: A :class:`~llm_gym.reasoning_gym.ReasoningGym` (or a multi-turn env: then one by one).
        max_problems: Evaluate the first this-many problems (rounded up to whole batches).
        split: ``"test"`` or ``"validation"``.
        greedy: One greedy completion per problem (fitness), else each agent's sampling settings.

    Returns:
        Per agent, the metrics of ``evaluate`` (``problems`` included), in agent order.
    """
    from llm_gym.algorithms.rollout.rollout import evaluate

    if isinstance(env, MultiTurnEnv) or not batched_population(agents):
        return [evaluate(agent, env, max_problems, greedy=greedy, split=split) for agent in agents]

    def roll(prompts: Sequence[dict[str, Any]]) -> list[Rollout]:
        batches = population_rollouts(agents, env, prompts, training=not greedy)
        assert batches is not None  # batched_population was checked above
        return batches

    return evaluate_with(env, roll, len(agents), max_problems, split=split)
