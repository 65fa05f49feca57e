"""Data-parallel training: N processes (``accelerate launch`` / ``torchrun``) train one population together.

The decision: **every process holds every agent** (the whole population as adapters on its own copy
of the one frozen base, so the population-on-one-base memory property holds per process), and
**each agent's batch is sharded across the processes**::

    every process: the same global batch of P prompts (same data order, same position)
      process r generates and scores prompts r::N of it, for every agent in turn
      GRPO update: normalisers summed over processes, LoRA gradients summed (one all-reduce per
                   agent and epoch), the same clipped step on every process
    evaluation: each process answers its share of every held-out batch; sums and counts gathered
    evolution: the same fitness on every process -> the same selection and mutation (identically
               seeded RNGs; checked after every evolution), no weights to send
    process 0 alone writes metrics, completion samples, checkpoints, elites and the summary

Why not agents per process: it would need adapters and optimizer states shipped between processes
at every selection, every process's share of the work would change with the population size, and a
population smaller than the process count would leave GPUs idle. Sharding the batch scales with
the batch, keeps selection local, and makes an N-process step equal the one-process step on the
same global batch (up to float summation order; ``tests/algorithms/test_distributed.py``).

The process group comes from the launcher's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``): NCCL on CUDA, gloo on CPU. ``accelerate launch --multi_gpu
--num_processes N`` and ``torchrun --nproc_per_node N`` set it; ``accelerate launch --cpu
--num_processes N`` without ``mpirun`` starts ONE process (accelerate's own behaviour), which
then trains alone.

Sampling differs per process (each process's torch RNG is its own), everything that must agree
(LoRA initialisation, data order, evolution) is shared: adapters are broadcast from process 0 at
the start, the data order is seeded, selection and mutation RNGs are seeded alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llm_gym.algorithms.plumbing.distributed import all_gather_objects, broadcast_object
from llm_gym.usage import UsageError

__all__ = ["DataParallel", "check_processes", "launched_world_size"]

logger = logging.getLogger(__name__)

_SUMMED = ("loss", "loss/policy", "completion/generated_tokens", "reward/failures")
"""Metric names (after ``agent<k>/`` and ``train/``) that add up over processes: each process's loss
is its share of the global-batch loss, token and failure counts are counts."""
_SHARED = ("grad_norm", "grpo/lr", "grpo/skipped_updates", "data/epoch")
"""Metric names that are the same on every process (taken from process 0)."""


def _metric_name(key: str) -> str:
    """``agent3/train/reward/failures`` -> ``reward/failures``: the name without agent and phase prefixes."""
    parts = key.split("/")
    if parts[0].startswith("agent"):
        parts = parts[1:]
    if parts and parts[0] in ("train", "eval"):
        parts = parts[1:]
    return "/".join(parts)


@dataclass
class DataParallel:
    """This process's place in a data-parallel run (one process: rank 0 of 1, every method a no-op).

    Attributes:
        rank: This process's rank.
        world_size: Processes in the run.
        owns_group: Whether :meth:`from_environment` created the process group (then :meth:`close` ends it).
        data_sharded: The env shards the data itself (a ReasoningGym built with an ``accelerator``:
            AgileRL's ``data_batch_size_per_gpu`` prompts per process, from its own shard).
        prompts: Training prompts this process rolled out so far (every agent, every step).
    """

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False
    data_sharded: bool = False
    prompts: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes logs, checkpoints, elites and the summary."""
        return self.rank == 0

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_environment(cls, timeout_s: float = 1800.0) -> DataParallel:
        """Join (or create) the process group the launcher describes; one process without a launcher.

        Args:
            timeout_s: How long a collective waits for the other processes before failing.

        Returns:
            This process's :class:`DataParallel`.
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size())
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
        if cuda:
            torch.cuda.set_device(local_rank)  # "cuda" then means this process's GPU
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            logger.warning("DeepSpeed settings are not applied: llm-gym all-reduces the LoRA gradients itself "
                           "(plain data-parallel; see docs/distributed.md)")  # fmt: skip
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), owns_group=True)

    def close(self) -> None:
        """End the process group if this object created it."""
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    def barrier(self) -> None:
        """Wait for every process."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Process 0 runs the block first (e.g. a checkpoint read that may repair a killed write), then the others."""
        if self.enabled and not self.is_main:
            self.barrier()
        yield
        if self.enabled and self.is_main:
            self.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process."""
        return broadcast_object(obj) if self.enabled else obj

    def prepare_env(self, env: Any, pop: Sequence[Any] = ()) -> None:
        """Make ``env`` serve this process its share of every batch (a no-op in one process).

        Args:
            env: The batched env.
            pop: The agents (refused when they use dynamic sampling).

        Raises:
            UsageError: An env that cannot be sharded (a multi-turn env), too few prompts per step
                for the processes (see :meth:`~llm_gym.reasoning_gym.ReasoningGym.shard_batches`), or
                agents with dynamic sampling.
        """
        if not self.enabled:
            return
        if any(getattr(getattr(a, "hps", None), "dynamic_sampling", False) for a in pop):
            raise UsageError(f"dynamic_sampling refills differ per process, so it trains in one process, not "
                             f"{self.world_size}: set dynamic_sampling=False or launch without --num_processes")
        if self.data_sharded or getattr(env, "batch_shard", None) == (self.rank, self.world_size):
            return  # already prepared
        accelerator = getattr(env, "accelerator", None)
        if accelerator is not None and int(getattr(accelerator, "num_processes", 1) or 1) > 1:
            self.data_sharded = True  # AgileRL's layout: this process's data shard, per-process batches
        elif hasattr(env, "shard_batches"):
            env.shard_batches(self.rank, self.world_size)
        else:
            raise UsageError(f"{type(env).__name__} cannot be sharded over {self.world_size} processes (multi-turn "
                             "envs train in one process): launch without --num_processes")  # fmt: skip
        if self.data_sharded:
            logger.info("process %d of %d: trains on its own shard of the data (the env's accelerator)", self.rank,
                        self.world_size)  # fmt: skip
        else:
            logger.info("process %d of %d: trains on prompts %d::%d of every batch", self.rank, self.world_size,
                        self.rank, self.world_size)  # fmt: skip

    def sync_start(self, pop: Sequence[Any], resumed_rng: Sequence[Any] | None = None) -> None:
        """Start every process from process 0's adapters, and give each process its own sampling RNG.

        Args:
            pop: The population (the same agents on every process).
            resumed_rng: The per-process RNG states a checkpoint saved (:meth:`rng_states`); when it
                holds this process's, it is restored, so a resume samples as the uninterrupted run.
        """
        if not self.enabled:
            return
        import torch.distributed as dist

        from llm_gym.algorithms.run.checkpoints import restore_rng_state

        for agent in pop:
            for p in agent._adapter_params():
                dist.broadcast(p.data, src=0)
            agent._weights_dirty = True
        if resumed_rng is not None and len(resumed_rng) == self.world_size:
            if not self.is_main:
                restore_rng_state(resumed_rng[self.rank])
        elif not self.is_main:
            # Process 0 keeps its stream; the others derive theirs from it and their rank, without drawing.
            state = torch.get_rng_state().numpy().tobytes()
            torch.manual_seed(zlib.crc32(state) + 7919 * self.rank)

    def rng_states(self) -> list[Any] | None:
        """Every process's RNG states (for a checkpoint; collective), or None in one process."""
        if not self.enabled:
            return None
        from llm_gym.algorithms.run.checkpoints import capture_rng_state

        return all_gather_objects(capture_rng_state())

    def check_in_step(self, pop: Sequence[Any]) -> None:
        """After evolution: every process must hold the same agents with the same hyper-parameters.

        Raises:
            RuntimeError: When a process's population differs from process 0's (its RNGs diverged).
        """
        if not self.enabled:
            return
        mine = [(int(a.index), a.adapter_name, dataclasses.asdict(a.hps)) for a in pop]
        for rank, theirs in enumerate(all_gather_objects(mine)):
            if theirs != mine:
                raise RuntimeError(f"process {rank}'s population differs from process {self.rank}'s after evolution: "
                                   "the processes must run with the same seed and the same selection/mutation settings")

    # ----------------------------------------------------------- evaluation
    def evaluate(self, policy: Any, env: Any, max_problems: int | None = None, *, split: str = "test") -> dict[str, float]:
        """:func:`~llm_gym.algorithms.rollout.rollout.evaluate`, with every process answering its share.

        Each held-out batch is sharded like a training batch; the sums of every metric and the
        counts are gathered, so every process returns the one-process evaluation's numbers (up to
        float summation order and batch padding in generation).

        Args:
            policy: The policy (a GRPO agent).
            env: The env (prepared with :meth:`prepare_env`).
            max_problems: Evaluate the first this-many problems (rounded up to whole batches).
            split: ``"test"`` or ``"validation"``.

        Returns:
            The metrics, ``problems`` included.
        """
        from llm_gym.algorithms.rollout import rollout as rollout_module

        if not self.enabled:
            return rollout_module.evaluate(policy, env, max_problems, split=split)
        self.prepare_env(env)  # e.g. the SFT start's evaluation, before the training loop prepares it
        if self.data_sharded:  # the env's own data shard: evaluate it, weight by the problems answered
            share = None if max_problems is None else -(-max_problems // self.world_size)
            local = rollout_module.evaluate(policy, env, share, split=split)
            n = local.pop("problems")
            sums = {k: (v if k == "reward/failures" else v * n) for k, v in local.items()}
            return _combine(all_gather_objects((sums, n)))
        total = env.num_problems(split)
        if max_problems is not None:
            total = min(total, max_problems)
        sums: dict[str, float] = {}
        seen = 0
        with env.eval_mode(split):
            prompts = env.reset(reset_dataloaders=True)
            for b in range(-(-total // env.batch_size_of(split))):
                if b:
                    prompts = env.reset()
                if not prompts:  # a last batch shorter than the process count
                    continue
                batch = rollout_module.rollout(policy, env, prompts, training=False)
                seen += batch.num_prompts
                for key, value in batch.metrics.items():
                    sums[key] = sums.get(key, 0.0) + value * (1.0 if key == "reward/failures" else batch.num_prompts)
        return _combine(all_gather_objects((sums, seen)))

    def test(self, agent: Any, env: Any, max_problems: int | None = None, *, split: str = "test",
             fitness: str = "reward") -> float:  # fmt: skip
        """:meth:`GRPO.test <llm_gym.algorithms.grpo.agent.GRPO.test>` through :meth:`evaluate`.

        Returns:
            The fitness (the same on every process), appended to ``agent.fitness``.
        """
        if not self.enabled:
            return agent.test(env, max_problems, split=split, fitness=fitness)
        from llm_gym.algorithms.evolution.fitness import fitness_of

        agent.last_eval = self.evaluate(agent, env, max_problems, split=split)
        score = fitness_of(agent.last_eval, fitness, getattr(getattr(env, "rubric", None), "max_total", None))
        agent.fitness.append(score)
        return score

    # -------------------------------------------------------------- metrics
    def reduce_metrics(self, metrics: dict[str, float], prompts: int) -> dict[str, float]:
        """One step's metrics over every process (collective).

        Losses, token and failure counts are summed (each process's loss is its share of the
        global-batch loss); gradient norm, learning rate, skipped updates and epoch are the same
        everywhere; every other metric is the mean over processes weighted by their prompts (exact
        for per-completion means such as rewards and accuracy; approximate for per-token ratios
        and ``reward/std``).

        Args:
            metrics: This process's metrics.
            prompts: The prompts behind them (this process's share of the step's batch).

        Returns:
            The global metrics (the same on every process).
        """
        self.prompts += prompts
        if not self.enabled:
            return metrics
        gathered = all_gather_objects((metrics, prompts))
        out: dict[str, float] = {}
        for key in sorted({k for m, _ in gathered for k in m}):
            name = _metric_name(key)
            present = [(m[key], n) for m, n in gathered if key in m]
            if name in _SHARED:
                out[key] = present[0][0]
            elif name in _SUMMED:
                out[key] = float(sum(v for v, _ in present))
            else:
                finite = [(v, n) for v, n in present if math.isfinite(v) and n > 0]
                weight = sum(n for _, n in finite)
                out[key] = sum(v * n for v, n in finite) / weight if weight else math.nan
        return out

    def prompts_per_process(self) -> list[int]:
        """Training prompts each process rolled out (collective); ``[prompts]`` in one process."""
        return [int(n) for n in all_gather_objects(self.prompts)] if self.enabled else [self.prompts]


def launched_world_size() -> int:
    """Processes of this run: the process group's size, else the launcher's ``WORLD_SIZE`` (1 without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_processes(prompts_per_step: int, train_size: int, multi_turn: bool = False,
                    dynamic_sampling: bool = False) -> None:
    """Refuse a launch with more processes than the data can keep busy, before any work.

    Args:
        prompts_per_step: Prompts of each training step (shared out over the processes).
        train_size: Training problems.
        multi_turn: Whether the task is a multi-turn game (trained in one process).
        dynamic_sampling: Whether the agents refill their batches (each process would refill differently).

    Raises:
        UsageError: Naming the value and the fix.
    """
    world = launched_world_size()
    if world <= 1:
        return
    if multi_turn:
        raise UsageError(f"multi-turn tasks train in one process, not {world}: launch without --num_processes")
    if dynamic_sampling:
        raise UsageError(f"dynamic_sampling refills differ per process, so it trains in one process, not {world}: "
                         "set dynamic_sampling: false or launch without --num_processes")  # fmt: skip
    if prompts_per_step < world:
        raise UsageError(f"--num_processes {world} is more than prompts_per_step={prompts_per_step} (each process "
                         f"takes a share of every step's prompts): set prompts_per_step >= {world} or launch "
                         f"--num_processes {prompts_per_step}")  # fmt: skip
    last = train_size % prompts_per_step
    if 0 < last < world:
        raise UsageError(f"train_size={train_size} leaves a last batch of {last} prompts per epoch for {world} "
                         f"processes: make train_size a multiple of prompts_per_step={prompts_per_step}")  # fmt: skip


def _combine(gathered: Sequence[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Evaluation sums and counts of every process -> means (``reward/failures`` stays a count)."""
    seen = sum(n for _, n in gathered)
    sums: dict[str, float] = {}
    for part, _ in gathered:
        for key, value in part.items():
            sums[key] = sums.get(key, 0.0) + value
    metrics = {k: (v if k == "reward/failures" else v / seen) for k, v in sums.items()} if seen else {}
    metrics["problems"] = float(seen)
    return metrics
