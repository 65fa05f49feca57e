"""Elites of a run: the best-K store written during training, and loading one back in one call.

:class:`EliteStore` keeps the ``keep`` best agents of a run by fitness, each in its own folder
``root/elite-step{step:06d}-agent{id}-fit{fitness:.4f}/`` written atomically: a plain PEFT
adapter (``adapter_config.json`` + ``adapter_model.safetensors``, loadable by peft, transformers
and vLLM), the agent's record (``llm_gym_agent.json``, :mod:`~llm_gym.algorithms.grpo.checkpoint`)
and ``elite.json`` (step, agent, fitness, hyper-parameters, lineage, task id, base model id).
``root/index.json`` lists the kept elites, best first.

``model, tokenizer = load_elite("checkpoints")`` loads the best one back: the base model is read
from those files, so the only thing a user needs is the folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from llm_gym.algorithms.grpo.checkpoint import ADAPTER_CONFIG, AGENT_FILE
from llm_gym.algorithms.plumbing.atomic import atomic_directory, atomic_write_text, recover_children
from llm_gym.usage import UsageError, looks_like_path

__all__ = ["ELITE_META", "INDEX_NAME", "EliteStore", "elite_metadata", "load_elite", "resolve_elite"]

logger = logging.getLogger(__name__)

ELITE_META = "elite.json"
"""Per-elite record: step, agent, fitness and the caller's metadata."""
INDEX_NAME = "index.json"
"""The kept elites of a store, best first."""


class EliteStore:
    """Keeps the ``keep`` best elite checkpoints of a run, by fitness.

    Each elite is a directory ``root/elite-step{step:06d}-agent{id}-fit{fitness:.4f}/`` written
    atomically by a caller callback, plus an ``elite.json`` inside it with the exact numbers and the
    caller's metadata. ``root/index.json`` lists the kept elites, best first; it is rewritten
    atomically after every change and rebuilt from the ``elite.json`` files on start, so elites
    written just before a crash are not lost.

    Ordering: higher fitness is better; equal fitness keeps the earlier elite (lower step, then
    lower agent id), so a later agent must be strictly better to displace it.

    Args:
        root: Directory holding the elites (created if needed).
        keep: How many elites to keep (>= 1).

    Raises:
        ValueError: If ``keep < 1``.
    """

    def __init__(self, root: str | os.PathLike[str], keep: int = 3) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"EliteStore keep={keep!r} must be an int >= 1.")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        self._entries: list[dict[str, Any]] = []
        self._load()

    @staticmethod
    def _order(entry: Mapping[str, Any]) -> tuple[float, int, int]:
        return (-float(entry["fitness"]), int(entry["step"]), int(entry["agent"]))

    def _load(self) -> None:
        entries = []
        recover_children(self.root)  # restore moved-aside copies, delete dead writers' temp dirs
        for child in sorted(self.root.iterdir()):
            meta = child / ELITE_META
            if child.name.startswith("elite-") and meta.is_file():
                try:
                    entry = json.loads(meta.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError) as err:
                    logger.warning("Ignoring elite %s: unreadable %s (%s).", child, ELITE_META, err)
                    continue
                entry["path"] = child.name
                entries.append(entry)
        self._entries = sorted(entries, key=self._order)
        if entries:
            logger.info("EliteStore %s: resumed with %d elites.", self.root, len(entries))
        self._evict()

    def _evict(self) -> None:
        kept, dropped = self._entries[: self.keep], self._entries[self.keep :]
        self._entries = kept
        self._write_index()
        for entry in dropped:
            shutil.rmtree(self.root / entry["path"], ignore_errors=True)
            logger.info("EliteStore: removed %s (not in the best %d).", entry["path"], self.keep)

    def _write_index(self) -> None:
        atomic_write_text(self.root / INDEX_NAME, json.dumps(self._entries, indent=2, sort_keys=True) + "\n")

    def would_keep(self, fitness: float, step: int = 0, agent: int = 0) -> bool:
        """Whether an elite with this fitness would enter the store.

        Args:
            fitness: Candidate fitness.
            step: Candidate training step (breaks ties).
            agent: Candidate agent id (breaks ties).

        Returns:
            True if the store has room or the candidate beats its worst elite.
        """
        if len(self._entries) < self.keep:
            return True
        candidate = {"fitness": fitness, "step": step, "agent": agent}
        return self._order(candidate) < self._order(self._entries[-1])

    def save(
        self,
        step: int,
        agent: int,
        fitness: float,
        save_fn: Callable[[Path], None],
        metadata: Mapping[str, Any] | None = None,
    ) -> Path | None:
        """Save an elite if it is among the best ``keep``, and drop the one it displaces.

        Args:
            step: Training step of the elite.
            agent: The agent's id.
            fitness: Its fitness (must be finite).
            save_fn: Writes the checkpoint (e.g. ``model.save_pretrained``) into the directory it
                is given; called only if the elite is kept.
            metadata: JSON-able extras stored in ``elite.json`` (hyper-parameters, lineage, ...).

        Returns:
            The elite's directory, or None if it was not good enough to keep.

        Raises:
            ValueError: If ``fitness`` is not finite.
        """
        if not math.isfinite(fitness):
            raise ValueError(
                f"Elite fitness {fitness!r} must be finite: evaluate the agent before saving it."
            )
        if not self.would_keep(fitness, step, agent):
            logger.debug("EliteStore: fitness %.4f does not beat the kept elites; not saved.", fitness)
            return None
        name = f"elite-step{step:06d}-agent{agent}-fit{fitness:.4f}"
        entry = {
            "step": int(step),
            "agent": int(agent),
            "fitness": float(fitness),
            "metadata": dict(metadata or {}),
        }
        with atomic_directory(self.root / name) as tmp:
            save_fn(tmp)
            (tmp / ELITE_META).write_text(
                json.dumps(entry, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        entry["path"] = name
        self._entries = sorted([e for e in self._entries if e["path"] != name] + [entry], key=self._order)
        self._evict()
        logger.info("EliteStore: saved %s.", name)
        return self.root / name

    def best(self) -> Path | None:
        """Directory of the best elite, or None if the store is empty."""
        return self.root / self._entries[0]["path"] if self._entries else None

    def entries(self) -> list[dict[str, Any]]:
        """The kept elites, best first: dicts with path, step, agent, fitness and metadata."""
        return [dict(e) for e in self._entries]


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
    if (path / ADAPTER_CONFIG).is_file():
        return path
    index = path / INDEX_NAME
    if index.is_file():
        for entry in json.loads(index.read_text(encoding="utf-8")):
            candidate = path / entry["path"]
            if (candidate / ADAPTER_CONFIG).is_file():
                return candidate
    best: tuple[float, Path] | None = None
    for child in sorted(path.iterdir()):
        meta = child / ELITE_META
        if (child / ADAPTER_CONFIG).is_file() and meta.is_file():
            fitness = float(json.loads(meta.read_text(encoding="utf-8")).get("fitness", float("-inf")))
            if best is None or fitness > best[0]:
                best = (fitness, child)
    if best is None:
        raise FileNotFoundError(
            f"{path} holds no elite: expected {ADAPTER_CONFIG} in it, or elite folders with {ELITE_META} "
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
    if (folder / AGENT_FILE).is_file():
        meta.update(json.loads((folder / AGENT_FILE).read_text(encoding="utf-8")))
    if (folder / ELITE_META).is_file():
        elite = json.loads((folder / ELITE_META).read_text(encoding="utf-8"))
        extra = elite.pop("metadata", {}) or {}
        meta.update({k: v for k, v in extra.items() if v is not None})
        meta.update(elite)
    meta["path"] = str(folder)
    return meta


def _base_model_id(folder: Path, meta: dict[str, Any]) -> str:
    base = meta.get("base_model")
    if not base:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"elite {folder} does not name its base model (no base_model in {ELITE_META} / {AGENT_FILE} and no "
            f"base_model_name_or_path in {ADAPTER_CONFIG}): pass base_model=<local path or hub id>"
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
        and the tokenizer saved with the elite, else the base model's (its ``pad_token`` set to EOS
        when it had none).

    Raises:
        FileNotFoundError: If ``path`` holds no elite.
        ValueError: If the base model is not recorded and not given.
        UsageError: If the recorded base model is a local folder that no longer exists.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_elite(path)
    meta = elite_metadata(folder)
    base_id = str(base_model) if base_model is not None else _base_model_id(folder, meta)
    if looks_like_path(base_id) and not Path(base_id).is_dir():
        raise UsageError(f"the base model {base_id} of {folder} (its {ADAPTER_CONFIG}) is gone: restore it, "
                         "or load with base_model=<local path or hub id>")  # fmt: skip
    kwargs = {"dtype": dtype} if dtype is not None else {}
    base = AutoModelForCausalLM.from_pretrained(base_id, **kwargs)
    model = PeftModel.from_pretrained(base, str(folder)).to(device or "cpu").eval()
    # Elites and checkpoints carry their tokenizer; older folders fall back to the base model's.
    tokenizer = AutoTokenizer.from_pretrained(str(folder) if (folder / "tokenizer_config.json").is_file() else base_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("loaded elite %s (fitness %s) on base %s", folder, meta.get("fitness"), base_id)
    return model, tokenizer
