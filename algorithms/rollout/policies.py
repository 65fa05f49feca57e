"""Policies other than the GRPO agent, for the same rollout: a task's oracle, and a plain causal LM.

``llm-gym eval`` scores them with :func:`~llm_gym.algorithms.rollout.rollout.evaluate`, exactly as
fitness scores an agent, so the numbers of the three mean the same thing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from llm_gym.algorithms.rollout.backend import SamplingConfig
from llm_gym.algorithms.rollout.hf import HFGenerationBackend, resolve_eos

__all__ = ["ModelPolicy", "OraclePolicy", "adapter_base"]


def adapter_base(model_id: str) -> str | None:
    """The base model of a saved PEFT adapter folder, or ``None`` when ``model_id`` is not one.

    The adapter's ``base_model_name_or_path`` is used as written when it exists (or is a hub id);
    a relative path that does not exist from here (it was relative to the training run's working
    folder) is looked up beside the run folder of an elite (``<run>/elites/<elite>`` ->
    ``<run>/<name>``).

    Raises:
        ValueError: the base model folder cannot be found (the message names it).
    """
    folder = Path(model_id)
    config = folder / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config} names no base_model_name_or_path: pass --model the base model")
    path = Path(base)
    if path.is_absolute() or path.exists():
        return str(path)
    beside = folder.resolve().parents[1] / path.name
    if beside.is_dir():
        return str(beside)
    if len(path.parts) == 2 and not base.startswith("."):  # owner/name: a hub id
        return base
    raise ValueError(f"the base model {base!r} of adapter {model_id} is not found (nor {beside}): run from the "
                     "training run's working folder, or fix base_model_name_or_path in adapter_config.json")


class OraclePolicy:
    """A task's oracle solver as a policy: the reference completion of each pending problem, as text.

    Args:
        task: The task (its ``solve``).
        env: The batched env whose pending problems it answers (``pending_problems()``).

    Raises:
        ValueError: If the task has no oracle.
    """

    def __init__(self, task: Any, env: Any) -> None:
        if task.solve is None:
            raise ValueError(f"{task.env_id} has no oracle solver: pass --model")
        self.task = task
        self.env = env

    def get_action(self, prompts: Sequence[dict[str, Any]], training: bool = False) -> tuple[list[list[str]], None]:
        """One oracle completion per prompt (``training`` is ignored: the oracle does not sample).

        Returns:
            ``(completions, None)``: per prompt a one-element list of text; no action masks.
        """
        problems = self.env.pending_problems()
        return [[self.task.solve(problem) or ""] for problem in problems], None


class ModelPolicy:
    """A causal LM as a policy: greedy completions through the HF generation backend.

    Args:
        model: A ``transformers`` causal LM (a PEFT model with its adapter active works too).
        pad_token_id: Padding id.
        max_new_tokens: Generation budget per completion.
        eos_token_id: Id(s) that end a completion; default the model's generation config.
    """

    def __init__(self, model: Any, pad_token_id: int, max_new_tokens: int, eos_token_id: Any = None) -> None:
        self.model = model.eval()
        self.pad_token_id = int(pad_token_id)
        self.max_new_tokens = max_new_tokens
        self.backend = HFGenerationBackend(model, self.pad_token_id, resolve_eos(model, eos_token_id, self.pad_token_id))

    @classmethod
    def from_pretrained(cls, model_id: str, max_new_tokens: int) -> tuple[ModelPolicy, Any]:
        """Load a model and its tokenizer (``pad_token`` set to EOS when it has none).

        Args:
            model_id: A local path or hub id, or the folder of a saved LoRA adapter (an elite of a
                run, ``runs/<time>/elites/elite-...``): its base model and tokenizer are loaded from
                :func:`adapter_base`, then the adapter on top.
            max_new_tokens: Generation budget per completion.

        Returns:
            ``(policy, tokenizer)``.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = adapter_base(model_id)
        # an elite saved with its tokenizer (the training loop does) uses that one, else its base model's
        own_tokenizer = (Path(model_id) / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(model_id if own_tokenizer else base or model_id)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(base or model_id)
        if base is not None:  # an elite (a saved LoRA adapter) on its base model
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, model_id)
        return cls(model, tokenizer.pad_token_id, max_new_tokens), tokenizer

    def get_action(
        self, prompts: Sequence[dict[str, Any]], training: bool = False, group_size: int | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """One greedy completion per prompt (an evaluation policy: ``training`` only samples ``group_size``).

        Returns:
            ``(completion_ids, action_masks)`` in the rollout's format.
        """
        sampling = SamplingConfig(group_size=group_size or 1, max_new_tokens=self.max_new_tokens, greedy=not training)
        out = self.backend.generate(prompts, sampling)
        return out.completion_ids, out.action_masks
