"""Collectives of data-parallel training over ``torch.distributed``, each a no-op in one process.

Only torch here, so the GRPO update can call it without importing the run package. The run's own
data-parallel logic (sharding, gathering evaluations, who writes) is in
:mod:`llm_gym.algorithms.run.distributed`.

Every function is collective when a process group of more than one process exists: all processes
must call it, in the same order, or they wait for each other forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["all_gather_objects", "all_reduce_grads", "all_reduce_sum", "broadcast_object", "rank", "world_size"]


def world_size() -> int:
    """Processes in the default process group (1 when none is initialised)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 when none is initialised)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _device() -> torch.device:
    """The device collectives run on: the current CUDA device for NCCL, else the CPU (gloo)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """The element-wise sum of ``values`` over all processes (in float64, so counts stay exact).

    Args:
        values: The same number of floats on every process.

    Returns:
        The sums, the same list on every process.
    """
    if world_size() == 1:
        return [float(v) for v in values]
    import torch.distributed as dist

    buffer = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.tolist()


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the ``.grad`` of ``params`` over all processes, in place (a missing gradient counts as zeros).

    One flat buffer per dtype and device, so a population's LoRA adapter costs one collective call,
    not one per tensor. Summed, not averaged: each process's loss is already weighted by its share
    of the global batch (:mod:`~llm_gym.algorithms.grpo.update`).

    Args:
        params: The same parameters, in the same order, on every process.
    """
    if world_size() == 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])  # [sum of numels]
        moved = flat.to(_device())
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        flat = moved.to(flat.device)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every process; ``obj`` itself in one process."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
