"""Load a saved elite in one call: ``model, tokenizer = load_elite("checkpoints")``.

An elite folder (written by ``finetune_llm_reasoning`` through
:class:`~llm_gym.algorithms.checkpointing.EliteStore`) is a plain PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``, loadable by peft, transformers and vLLM)
plus ``elite.json`` (step, agent, fitness, hyper-parameters, lineage, task id, base model id) and
``llm_gym_agent.json`` (the agent's own record). The base model is read from those files, so the
only thing a user needs is the folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["load_elite", "resolve_elite", "elite_metadata"]

logger = logging.getLogger(__name__)

_ADAPTER_CONFIG = "adapter_config.json"
_ELITE_META = "elite.json"
_AGENT_META = "llm_gym_agent.json"
_INDEX = "index.json"


def resolve_elite(path: str | os.PathLike[str]) -> Path:
    """The elite folder that ``path`` names: the folder itself, or the best elite of an elite root.

    Args:
        path: An elite folder (holds ``adapter_config.json``), or the root that
            ``finetune_llm_reasoning(elite_path=...)`` wrote (the best elite is taken: the first
            entry of ``index.json``, else the highest ``fitness`` among the ``elite.json`` files).

    Returns:
        The elite folder.

    Raises:
        FileNotFoundError: If ``path`` does not exist or holds no elite.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"elite path {path} does not exist: give an elite folder or the elite_path of a run")
    if (path / _ADAPTER_CONFIG).is_file():
        return path
    index = path / _INDEX
    if index.is_file():
        for entry in json.loads(index.read_text(encoding="utf-8")):
            candidate = path / entry["path"]
            if (candidate / _ADAPTER_CONFIG).is_file():
                return candidate
    best: tuple[float, Path] | None = None
    for child in sorted(path.iterdir()):
        meta = child / _ELITE_META
        if (child / _ADAPTER_CONFIG).is_file() and meta.is_file():
            fitness = float(json.loads(meta.read_text(encoding="utf-8")).get("fitness", float("-inf")))
            if best is None or fitness > best[0]:
                best = (fitness, child)
    if best is None:
        raise FileNotFoundError(
            f"{path} holds no elite: expected {_ADAPTER_CONFIG} in it, or elite folders with {_ELITE_META} "
            "(the elite_path of finetune_llm_reasoning)"
        )
    return best[1]


def elite_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of an elite: ``elite.json`` merged over ``llm_gym_agent.json`` (either may be missing).

    Args:
        path: An elite folder or an elite root (see :func:`resolve_elite`).

    Returns:
        A dict with, when known, ``base_model``, ``task``, ``step``, ``agent``, ``fitness``,
        ``hyperparameters``, ``lineage`` and ``path``.
    """
    folder = resolve_elite(path)
    meta: dict[str, Any] = {}
    if (folder / _AGENT_META).is_file():
        meta.update(json.loads((folder / _AGENT_META).read_text(encoding="utf-8")))
    if (folder / _ELITE_META).is_file():
        elite = json.loads((folder / _ELITE_META).read_text(encoding="utf-8"))
        extra = elite.pop("metadata", {}) or {}
        meta.update({k: v for k, v in extra.items() if v is not None})
        meta.update(elite)
    meta["path"] = str(folder)
    return meta


def _base_model_id(folder: Path, meta: dict[str, Any]) -> str:
    base = meta.get("base_model")
    if not base:
        config = json.loads((folder / _ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"elite {folder} does not name its base model (no base_model in {_ELITE_META} / {_AGENT_META} and no "
            f"base_model_name_or_path in {_ADAPTER_CONFIG}): pass base_model=<local path or hub id>"
        )
    return str(base)


def load_elite(
    path: str | os.PathLike[str],
    *,
    base_model: str | os.PathLike[str] | None = None,
    device: str | None = None,
    dtype: Any = None,
) -> tuple[Any, Any]:
    """Load an elite as a model ready to generate, and its tokenizer, in one call.

    Example::

        model, tokenizer = load_elite("checkpoints")          # the best elite of a run
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        out = model.generate(ids, max_new_tokens=64, do_sample=False)

    Args:
        path: An elite folder, or the elite root of a run (its best elite is loaded).
        base_model: The base model (local path or hub id); default the one the elite records.
        device: Where to put the model (default CPU).
        dtype: Dtype of the base weights (default: as saved).

    Returns:
        ``(model, tokenizer)``: a ``peft.PeftModel`` in eval mode with the elite's adapter active,
        and the base model's tokenizer (its ``pad_token`` set to EOS when it had none).

    Raises:
        FileNotFoundError: If ``path`` holds no elite.
        ValueError: If the base model is not recorded and not given.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_elite(path)
    meta = elite_metadata(folder)
    base_id = str(base_model) if base_model is not None else _base_model_id(folder, meta)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    base = AutoModelForCausalLM.from_pretrained(base_id, **kwargs)
    model = PeftModel.from_pretrained(base, str(folder)).to(device or "cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(base_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("loaded elite %s (fitness %s) on base %s", folder, meta.get("fitness"), base_id)
    return model, tokenizer
