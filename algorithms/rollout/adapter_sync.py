"""Which version of each LoRA adapter a vLLM backend serves, and re-serving the ones that changed.

Both vLLM backends (the colocated engine, :mod:`~llm_gym.algorithms.rollout.vllm`, and the HTTP server,
:mod:`~llm_gym.algorithms.rollout.vllm_server`) keep a copy of every agent's adapter on the other side
and must load a new copy whenever the trainer's adapter changed. :class:`AdapterSync` holds that
bookkeeping once; each backend only says how to load an adapter (save it, hand it to vLLM under a
fresh id or name) and how to unload one.

An adapter counts as changed when its :func:`adapter_fingerprint` (a checksum of the tensors'
CONTENTS, computed where they live) differs from the one recorded at its last sync. Content, not
torch's ``_version`` counter, because writes through ``param.data`` (and ``copy_`` into
``.data``, a common way to hand-edit or restore weights) do not bump the counter, so an adapter
trained or edited outside ``learn``/``load``/``clone`` would otherwise never reach vLLM.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["AdapterSync", "ServedAdapter", "adapter_fingerprint", "adapter_tensors", "save_adapter"]

logger = logging.getLogger(__name__)

_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def adapter_tensors(model: Any, adapter_name: str) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, parameter)`` pairs of one adapter of a PEFT model (names hold ``.<adapter_name>.``)."""
    marker = f".{adapter_name}."
    return [(n, p) for n, p in model.named_parameters() if marker in n]


def _position_weights(numel: int, device: torch.device) -> torch.Tensor:
    key = (numel, str(device))
    if key not in _WEIGHTS:
        _WEIGHTS[key] = torch.linspace(1.0, 2.0, numel, dtype=torch.float64, device=device)
    return _WEIGHTS[key]


@torch.no_grad()
def adapter_fingerprint(model: Any, adapter_name: str) -> tuple[float, ...]:
    """A checksum of an adapter's tensor contents: per tensor its sum and a position-weighted sum.

    Computed in float64 on the tensors' own device with one transfer for the whole adapter (a few
    reductions over the LoRA weights, cheap next to a generation call). Any write changes it
    (through ``param.data`` too), except edits crafted to keep both sums, or changes below float64
    rounding of the sums (~1e-16 relative; a bf16 or fp32 weight cannot change by so little).

    Args:
        model: The PEFT model.
        adapter_name: The adapter.

    Returns:
        Two floats per tensor, in parameter order (empty if the model has no such adapter).
    """
    sums = []
    for _, param in adapter_tensors(model, adapter_name):
        flat = param.detach().reshape(-1).to(torch.float64)
        sums.append(torch.stack([flat.sum(), flat @ _position_weights(flat.numel(), flat.device)]))
    if not sums:
        return ()
    return tuple(torch.cat(sums).cpu().tolist())


def save_adapter(model: Any, adapter_name: str, folder: Path) -> Path:
    """Write an adapter as a plain PEFT folder (``adapter_model.safetensors`` + ``adapter_config.json``).

    Args:
        model: The PEFT model.
        adapter_name: The adapter.
        folder: Where to write it (replaced if it exists).

    Returns:
        ``folder``.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, folder / "adapter_model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    model.peft_config[adapter_name].save_pretrained(str(folder))
    return folder


@dataclass
class ServedAdapter:
    """One adapter as the backend serves it.

    Attributes:
        handle: The backend's own record of it (a ``LoRARequest``, a served name, ...).
        fingerprint: :func:`adapter_fingerprint` when it was loaded.
        model: The PEFT model it belongs to.
    """

    handle: Any
    fingerprint: tuple[float, ...]
    model: Any


class AdapterSync:
    """The adapters a backend serves, each loaded again whenever its contents changed.

    Args:
        model: The model adapters are looked up in when they were never served.
        load: ``(model, adapter_name) -> handle``: save the adapter and load it on the serving side
            under a fresh id or name.
        unload: ``handle -> None``: drop a version no longer used (its id or name and its files).

    Attributes:
        served: By adapter name, what is served.
    """

    def __init__(self, model: Any, load: Callable[[Any, str], Any], unload: Callable[[Any], None]) -> None:
        self.model = model
        self._load = load
        self._unload = unload
        self.served: dict[str, ServedAdapter] = {}

    def serve(self, model: Any, name: str) -> Any:
        """Unload the previous version of adapter ``name`` of ``model``, then load it now (a new version).

        Adapters deleted from their model since (released population members) are unloaded first.
        Unloading before loading keeps the engine's adapter cache (an LRU of ``max_cpu_loras``
        entries) from evicting another agent's current adapter to make room for one about to go.

        Returns:
            The new handle.

        Raises:
            Whatever ``load`` raises; the adapter is then not served (the next generation retries).
        """
        for gone in [n for n, s in self.served.items() if n not in s.model.peft_config]:
            self._unload(self.served.pop(gone).handle)
        old = self.served.pop(name, None)
        if old is not None:
            self._unload(old.handle)
        fingerprint = adapter_fingerprint(model, name)
        handle = self._load(model, name)
        self.served[name] = ServedAdapter(handle, fingerprint, model)
        return handle

    def current(self, name: str) -> Any:
        """The handle of adapter ``name``, serving it first if it is new or changed since its last sync.

        Raises:
            KeyError: If the model has no such adapter.
        """
        served = self.served.get(name)
        model = served.model if served is not None else self.model
        if name not in model.peft_config:
            raise KeyError(f"adapter {name!r} is not in the model (adapters: {sorted(model.peft_config)})")
        if served is not None and served.fingerprint == adapter_fingerprint(model, name):
            return served.handle
        if served is not None:
            logger.info("adapter %r changed outside learn/load/clone since its last sync: re-syncing", name)
        return self.serve(model, name)

    def clear(self) -> list[Any]:
        """Forget every served adapter; returns their handles (for a backend that closes)."""
        handles = [s.handle for s in self.served.values()]
        self.served.clear()
        return handles

    def __len__(self) -> int:
        return len(self.served)
