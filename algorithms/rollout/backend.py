"""Generation backends: turn a batch of prompts into ``G`` completions each.

A backend takes the environment's prompts (``{"input_ids": [1, L_i], "attention_mask": [1, L_i],
"text": str | None}``) and returns, per prompt, AgileRL's format:

* ``completion_ids``: ``[G, L_i + C_i]``, the prompt's own (unpadded) ids followed by the generated
  ids, right-padded with ``pad_token_id``;
* ``action_mask``: ``[G, L_i + C_i - 1]`` bool, aligned with next-token logits: position ``t`` is
  True when token ``t + 1`` is a generated token, up to and including the first EOS.

The mask is built from what was generated, never from the ids: with ``pad_token = eos_token``
(seed 001) padding cannot be told apart from a real EOS by looking at ids.

:class:`HFGenerationBackend` uses the training model itself (the CPU default: a lean decoding loop,
:mod:`llm_gym.algorithms.rollout.decoding`, or ``transformers`` ``generate``); the vLLM backend
lives in :mod:`llm_gym.algorithms.rollout.vllm` and is imported only when asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["GenerationBackend", "GenerationOutput", "SamplingConfig", "generation_budget"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode.

    Attributes:
        group_size: Completions per prompt (``G``); 1 for evaluation.
        max_new_tokens: Generation budget in tokens per completion.
        greedy: Take the most likely token (evaluation); the sampling fields are then ignored.
        temperature: Softmax temperature when sampling.
        top_p: Nucleus sampling threshold (1.0 = off).
        top_k: Keep the ``top_k`` most likely tokens (0 = off).
    """

    group_size: int
    max_new_tokens: int
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class GenerationOutput:
    """Completions of one batch, per prompt.

    Attributes:
        completion_ids: Per prompt a LongTensor ``[G, L_i + C_i]`` (prompt then completion).
        action_masks: Per prompt a BoolTensor ``[G, L_i + C_i - 1]`` (see module docstring).
    """

    completion_ids: list[Tensor]
    action_masks: list[Tensor]


@runtime_checkable
class GenerationBackend(Protocol):
    """What the GRPO agent needs from a generator.

    A backend may keep its own copy of the weights (vLLM); :meth:`sync` is called before
    generating whenever the trainable adapter changed since the last call.
    """

    def generate(
        self, prompts: Sequence[dict[str, Any]], sampling: SamplingConfig, adapter_name: str = "default"
    ) -> GenerationOutput:
        """Generate ``sampling.group_size`` completions for each prompt with the named adapter."""
        ...

    def sync(self, agent: Any) -> None:
        """Bring the backend's weights up to date with the agent's adapter."""
        ...


def generation_budget(
    prompt_len: int, max_output_tokens: int, max_model_len: int | None, *, warn: bool = True
) -> int:
    """Tokens that may be generated after a prompt of ``prompt_len`` tokens.

    The budget is cut to ``max_model_len - prompt_len`` when the prompt plus ``max_output_tokens``
    would not fit, with a warning.

    Args:
        prompt_len: Length of the (longest) prompt in tokens.
        max_output_tokens: Requested generation budget.
        max_model_len: Context length of the model (prompt + completion), or None for no limit.
        warn: Log a warning when the budget is cut.

    Returns:
        The budget, at least 1.

    Raises:
        ValueError: If the prompt alone fills the context (no token could be generated).
    """
    if max_model_len is None or prompt_len + max_output_tokens <= max_model_len:
        return max_output_tokens
    budget = max_model_len - prompt_len
    if budget < 1:
        raise ValueError(
            f"a prompt of {prompt_len} tokens leaves no room to generate within max_model_len={max_model_len}; "
            f"raise max_model_len or drop long prompts (ReasoningGym(max_context_length=...))"
        )
    if warn:
        logger.warning(
            "prompt of %d tokens + max_output_tokens=%d exceeds max_model_len=%d: generating at most %d tokens "
            "for this batch (warned once per agent)",
            prompt_len, max_output_tokens, max_model_len, budget,
        )  # fmt: skip
    return budget
