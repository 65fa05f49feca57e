"""The policy model of a GRPO agent: loading it, its LoRA adapters, its device and its padding id.

Plain functions over a ``transformers`` causal LM wrapped by PEFT, so the agent class
(:mod:`~llm_gym.algorithms.grpo.agent`) only wires them (the EOS ids: :func:`~llm_gym.algorithms.rollout.hf.resolve_eos`). A population shares one PEFT model: each
agent is a named adapter of it (:func:`copy_adapter` clones one without copying the base).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = [
    "adapter_params",
    "check_pad_token_id",
    "copy_adapter",
    "default_lora_config",
    "load_model",
    "resolve_device",
    "wrap_peft",
]


def load_model(model: str | Any, device: torch.device, dtype: torch.dtype | None = None) -> tuple[Any, str]:
    """The causal LM and its id: load ``model`` when it is a local path or hub id, else take the object.

    Args:
        model: A path / hub id, or a model object.
        device: The training device (decides the default dtype).
        dtype: Dtype when loading from a path (default: bf16 on CUDA, fp32 on CPU).

    Returns:
        ``(model, model_id)``; ``model_id`` is the path / hub id (from ``config._name_or_path`` for
        an object), ``""`` when unknown.
    """
    model_id = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    if isinstance(model, str):
        from transformers import AutoModelForCausalLM

        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    return model, model_id


def wrap_peft(model: Any, lora_config: Any, adapter_name: str) -> Any:
    """``model`` as a PEFT model holding an adapter named ``adapter_name`` (added if missing).

    Args:
        model: A causal LM, or a ``PeftModel`` (another agent's: the adapter is added to it).
        lora_config: ``peft.LoraConfig``; default :func:`default_lora_config`.
        adapter_name: The agent's adapter.

    Returns:
        The ``PeftModel``.

    Raises:
        ValueError: If ``model`` cannot generate (not a causal LM).
    """
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        if adapter_name not in model.peft_config:
            model.add_adapter(adapter_name, lora_config or default_lora_config())
        return model
    if not hasattr(model, "generate"):
        raise ValueError(
            f"the model must be a causal LM with generate() (e.g. AutoModelForCausalLM), got {type(model).__name__}"
        )
    return get_peft_model(model, lora_config or default_lora_config(), adapter_name=adapter_name)


def adapter_params(model: Any, adapter_name: str) -> list[torch.nn.Parameter]:
    """The parameters of one adapter of a (shared) PEFT model.

    Raises:
        ValueError: If the adapter has no parameters.
    """
    marker = f".{adapter_name}."
    params = [p for n, p in model.named_parameters() if marker in n]
    if not params:
        raise ValueError(f"adapter {adapter_name!r} has no parameters in the model")
    return params


def copy_adapter(model: Any, source: str, target: str | None = None) -> str:
    """Add a copy of adapter ``source`` to the PEFT ``model`` (same config, cloned tensors).

    Args:
        model: A ``PeftModel``.
        source: Name of the adapter to copy.
        target: Name of the new adapter; default ``"<source>_clone<k>"`` with the first free ``k``.

    Returns:
        The new adapter's name.

    Raises:
        ValueError: If ``target`` is already taken.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    if target is None:
        k = 1
        while f"{source}_clone{k}" in model.peft_config:
            k += 1
        target = f"{source}_clone{k}"
    if target in model.peft_config:
        raise ValueError(f"adapter name {target!r} is already used in this model; pick another")
    model.add_adapter(target, copy.deepcopy(model.peft_config[source]))
    state = get_peft_model_state_dict(model, adapter_name=source)
    set_peft_model_state_dict(model, {k: v.clone() for k, v in state.items()}, adapter_name=target)
    return target


def check_pad_token_id(model: Any, pad_token_id: int | None) -> int:
    """Validate the padding id against the model's vocabulary.

    Args:
        model: The causal LM.
        pad_token_id: The id to check.

    Returns:
        The id as an ``int``.

    Raises:
        ValueError: If it is None or outside the vocabulary, with the fix.
    """
    vocab = model.get_input_embeddings().num_embeddings
    if pad_token_id is None:
        raise ValueError(
            "pad_token_id is None: GRPO pads prompts of different lengths into one batch and needs a padding "
            "id. Set tokenizer.pad_token = tokenizer.eos_token and pass pad_token_id=tokenizer.pad_token_id"
        )
    if not 0 <= int(pad_token_id) < vocab:
        raise ValueError(
            f"pad_token_id={pad_token_id} is outside the model's vocabulary [0, {vocab}); pass an id of the "
            "same tokenizer as the model (e.g. tokenizer.eos_token_id)"
        )
    return int(pad_token_id)


def default_lora_config() -> Any:
    """The LoRA adapter used when none is given: ``r=16, alpha=32``, every linear layer, no dropout.

    Returns:
        A ``peft.LoraConfig``.
    """
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def resolve_device(device: Any, accelerator: Any) -> torch.device:
    """The device to train on: ``device`` if given, else the accelerator's, else CUDA when available, else CPU.

    Args:
        device: A device or its name, or None.
        accelerator: An ``accelerate.Accelerator`` or None.

    Returns:
        The ``torch.device``.
    """
    if device is not None:
        return torch.device(device)
    if accelerator is not None and getattr(accelerator, "device", None) is not None:
        return torch.device(accelerator.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
