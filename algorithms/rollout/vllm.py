"""vLLM generation backend: a colocated engine serving the agents' LoRA adapters.

One ``vllm.LLM`` holds the base model on the trainer's GPU (``enable_lora=True``). Each adapter is
saved to a temporary folder and loaded into the engine under a fresh ``LoRARequest`` id whenever it
changed (vLLM caches adapters and prefixes by id, so a new id is what makes it reload), so only
LoRA weights move, never the base. "Changed" is checked before every generation by a checksum of
the adapter's contents (:mod:`~llm_gym.algorithms.rollout.adapter_sync`), so edits made outside
``learn``/``load``/``clone`` reach the engine too. A population shares one engine (sized for it by
``VLLMConfig.population_size``): each of its rollout or evaluation batches is ONE ``llm.generate``
call (:meth:`VLLMBackend.generate_batches`, used by
:func:`~llm_gym.algorithms.rollout.population.population_generate`).

Phases: with ``sleep_mode`` the engine sleeps (level 1: weights to CPU, KV cache dropped) while the
trainer learns and wakes lazily on the first generation or sync of the next rollout or evaluation
phase. ``GRPO.learn`` calls :meth:`VLLMBackend.sleep` once at the start of each learn phase; until
the first call the backend sleeps after every generation call (correct, but one cycle per batch).
``GRPO.close`` (called by ``finetune_llm_reasoning`` at its end) shuts the engine down.

Engine settings and the checks made when it is built live in :mod:`~llm_gym.algorithms.rollout.vllm_engine`
(re-exported here). ``vllm`` is imported only when this backend is built (``GRPO(use_vllm=True)``);
this module itself, and :class:`VLLMConfig`, import without it.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import logging
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llm_gym.algorithms.grpo.loss import truncated_importance_weights
from llm_gym.algorithms.rollout.adapter_sync import AdapterSync, save_adapter
from llm_gym.algorithms.rollout.backend import (
    AdapterBatch,
    GenerationOutput,
    SamplingConfig,
    generation_budget,
)
from llm_gym.algorithms.rollout.completions import left_pad, split_completions
from llm_gym.algorithms.rollout.vllm_engine import (
    LORA_RANKS,
    VLLMConfig,
    check_engine_process,
    check_lora_config,
    engine_kwargs,
    executor_for,
    import_vllm,
    lora_rank_for,
    process_ranks,
    set_launcher_env,
)

__all__ = [
    "LORA_RANKS",
    "AdapterBatch",
    "VLLMBackend",
    "VLLMConfig",
    "build_vllm_backend",
    "check_lora_config",
    "convert_outputs",
    "fit_batch",
    "import_vllm",
    "logprob_drift",
    "lora_rank_for",
    "sampling_params_kwargs",
    "truncated_importance_weights",
]

logger = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[VLLMBackend] = weakref.WeakSet()


def fit_batch(
    batch: AdapterBatch, pad_token_id: int, max_model_len: int | None, warned: set[str]
) -> tuple[list[Tensor], SamplingConfig]:
    """A batch's prompts as 1-D ids and its sampling settings with the budget cut to the context (both vLLM backends).

    Args:
        batch: The adapter's prompts and decoding settings.
        pad_token_id: Padding id (prompts are unpadded here).
        max_model_len: The engine's context length, or None.
        warned: The backend's warned-once keys (``"budget"`` is added when the budget is cut).

    Returns:
        ``(ids, sampling)``.

    Raises:
        ValueError: If a prompt alone fills ``max_model_len``.
    """
    _, _, ids = left_pad(batch.prompts, pad_token_id)
    budget = generation_budget(max(len(i) for i in ids), batch.sampling.max_new_tokens, max_model_len,
                               warn="budget" not in warned)  # fmt: skip
    if budget < batch.sampling.max_new_tokens:
        warned.add("budget")
    return ids, dataclasses.replace(batch.sampling, max_new_tokens=budget)


def sampling_params_kwargs(
    sampling: SamplingConfig, eos_token_ids: Sequence[int], logprobs: bool = False
) -> dict[str, Any]:
    """Our :class:`SamplingConfig` as ``vllm.SamplingParams`` keyword arguments.

    Completions stop on exactly the agent's EOS set, as in the HF backend: ``ignore_eos=True`` keeps
    vLLM from also stopping on the tokenizer's and the generation config's EOS ids. Only token ids
    are read back (``detokenize=False``).

    Args:
        sampling: Decoding settings.
        eos_token_ids: Ids that end a completion (``stop_token_ids``).
        logprobs: Return each sampled token's log-prob (``logprobs=0``).

    Returns:
        Keyword arguments for ``SamplingParams``.
    """
    kwargs: dict[str, Any] = {
        "n": sampling.group_size,
        "max_tokens": sampling.max_new_tokens,
        "stop_token_ids": [int(e) for e in eos_token_ids],
        "ignore_eos": True,
        "detokenize": False,
    }
    if sampling.greedy:
        kwargs.update(temperature=0.0, top_p=1.0, top_k=-1)  # temperature 0 is greedy in vLLM
    else:
        kwargs.update(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,  # -1 disables top-k in vLLM
        )
    if logprobs:
        kwargs["logprobs"] = 0  # the sampled token only
    return kwargs


class VLLMBackend:
    """Generation through a colocated ``vllm.LLM`` with per-agent LoRA requests.

    Args:
        agent: The GRPO agent that builds it (model id, dtype, ``max_model_len``, LoRA config,
            accelerator); its clones share the model, and this backend.
        config: Engine settings.

    Attributes:
        engine_kwargs: The keyword arguments the engine was built with (every default resolved).
        last_logprobs: With ``config.logprobs``: per batch of the last call, per prompt a float
            tensor shaped like its action mask, the sampled tokens' log-probs where the mask is True.

    Raises:
        ImportError: If vLLM is not installed.
        ValueError: If the agent was built from a model object with no local path or hub id, or its
            ``LoraConfig`` cannot be served.
    """

    def __init__(self, agent: Any, config: VLLMConfig) -> None:
        self.vllm = import_vllm()
        self.config = config
        if not agent.model_id:
            raise ValueError(
                "the vLLM backend loads the base model by name: build the agent with model_name=<path or hub id> "
                "(or a model whose config has _name_or_path)"
            )
        check_lora_config(agent.model.peft_config[agent.adapter_name], config.max_lora_rank)
        executor = executor_for(config)
        if executor == "external_launcher":
            set_launcher_env(agent)
        elif process_ranks(agent)[2] > 1:
            logger.warning("with %s vLLM starts every rank's engine on the first GPUs: use tensor_parallel_size=1 "
                           "(in-process engine on each rank's GPU)", executor or "vLLM's default executor")  # fmt: skip
        check_engine_process(executor)
        kwargs = engine_kwargs(agent, config)
        if len(_LIVE):
            logger.warning("%d vLLM engine(s) built by other agents are still running in this process, each holding "
                           "gpu_memory_utilization of the GPU: close() their backends, or share one engine by "
                           "cloning agents (GRPO.clone, GRPO.population)", len(_LIVE))  # fmt: skip
        self.pad_token_id = agent.pad_token_id
        self.eos_token_ids = list(agent.eos_token_ids)
        self.engine_kwargs = kwargs
        self.max_model_len = int(kwargs["max_model_len"])
        self.max_lora_rank = int(kwargs["max_lora_rank"])
        self.max_cpu_loras = int(kwargs["max_cpu_loras"])
        self.llm: Any = self.vllm.LLM(**kwargs)
        self._tmp = Path(tempfile.mkdtemp(prefix="llm_gym_vllm_"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        self._adapters = AdapterSync(agent.model, self._load, self._unload)
        self._next_id = 1
        self._asleep = False
        self._phases = False  # True once the training loop calls sleep() itself
        self._warned: set[str] = set()
        self.last_logprobs: list[list[Tensor]] | None = None
        _LIVE.add(self)

    # ------------------------------------------------------------------ phases
    def sleep(self) -> None:
        """Start a learn phase: release the engine's GPU memory (sleep mode only), once.

        The first call also hands phase control to the caller: from then on generation calls no
        longer sleep after themselves, and the engine stays awake through a rollout or evaluation
        phase until the next ``sleep()``.
        """
        self._phases = True
        self._sleep()

    def _sleep(self) -> None:
        if self.config.sleep_mode and not self._asleep and self.llm is not None:
            self.llm.sleep(level=self.config.sleep_level)
            self._asleep = True

    def wake_up(self) -> None:
        """Restore the engine after :meth:`sleep`; first return the trainer's cached blocks to CUDA."""
        if self._asleep:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # activations and gradients of learn() are still cached
            self.llm.wake_up()
            self._asleep = False

    # ----------------------------------------------------------------- adapters
    def sync(self, agent: Any) -> None:
        """Save the agent's adapter and load it into the engine now, under a fresh LoRA id.

        Args:
            agent: The GRPO agent whose adapter changed.

        Raises:
            ValueError: If the adapter's ``LoraConfig`` cannot be served.
            RuntimeError: If vLLM fails to load the adapter.
        """
        self._check_open()
        self._serve(agent.model, agent.adapter_name)

    def _serve(self, model: Any, name: str) -> None:
        self._adapters.serve(model, name)
        self._check_cpu_loras()

    def _load(self, model: Any, name: str) -> Any:
        """Save adapter ``name`` to a folder of its own and load it into the engine under a fresh id."""
        check_lora_config(model.peft_config[name], self.max_lora_rank)
        lora_id = self._next_id
        self._next_id += 1
        folder = save_adapter(model, name, self._tmp / f"{name}-{lora_id}")
        self.wake_up()  # add_lora writes the adapter into GPU slots
        request = importlib.import_module("vllm.lora.request").LoRARequest(f"{name}-{lora_id}", lora_id, str(folder))
        try:
            loaded = self.llm.llm_engine.add_lora(request)
        except Exception as err:
            raise RuntimeError(f"vLLM could not load the adapter {name!r} saved in {folder}: {err}") from err
        if loaded is False:
            raise RuntimeError(f"vLLM refused the adapter {name!r} saved in {folder} (add_lora returned False)")
        return request

    def _unload(self, request: Any) -> None:
        """Remove an adapter version from the engine (awake: its GPU slot is written) and delete its folder."""
        if self.llm is not None:
            self.wake_up()  # always followed by a load, which wakes the engine anyway
            self.llm.llm_engine.remove_lora(request.lora_int_id)
        shutil.rmtree(request.lora_path, ignore_errors=True)

    def _ensure_served(self, name: str) -> Any:
        """The adapter's current request, syncing it first if it is new or changed since its last sync."""
        request = self._adapters.current(name)
        self._check_cpu_loras()
        return request

    def _check_cpu_loras(self) -> None:
        if len(self._adapters) > self.max_cpu_loras:
            self._warn_once("cpu", "%d adapters are served but max_cpu_loras=%d: switching agents re-reads adapters "
                            "from disk; build the population with create_population (it sizes the engine) or set "
                            "VLLMConfig(population_size=N)", len(self._adapters), self.max_cpu_loras)  # fmt: skip

    # --------------------------------------------------------------- generation
    def generate(
        self, prompts: Sequence[dict[str, Any]], sampling: SamplingConfig, adapter_name: str = "default"
    ) -> GenerationOutput:
        """Generate with the named adapter; one ``llm.generate`` call for all prompts.

        Args:
            prompts: The environment's prompts.
            sampling: Decoding settings.
            adapter_name: Whose adapter to use (synced first if it changed or was never synced).

        Returns:
            The :class:`GenerationOutput`, in the same format as the HF backend.

        Raises:
            KeyError: If the model has no such adapter.
            ValueError: If a prompt alone fills the engine's ``max_model_len``.
        """
        return self.generate_batches([AdapterBatch(adapter_name, prompts, sampling)])[0]

    def generate_batches(self, batches: Sequence[AdapterBatch]) -> list[GenerationOutput]:
        """Generate for several adapters (a population) in ONE ``llm.generate`` call.

        Each prompt carries its batch's ``LoRARequest`` and ``SamplingParams``; vLLM schedules up to
        ``max_loras`` adapters per step.

        Args:
            batches: Per adapter its prompts and decoding settings.

        Returns:
            One :class:`GenerationOutput` per batch, in order.

        Raises:
            KeyError: If the model has no such adapter.
            ValueError: If there are no batches or a prompt alone fills the engine's ``max_model_len``.
            RuntimeError: After :meth:`close`.
        """
        self._check_open()
        if not batches:
            raise ValueError("got no batches: pass one AdapterBatch per adapter")
        requests, params, unpadded = [], [], []
        for batch in batches:
            ids, sampling = fit_batch(batch, self.pad_token_id, self.max_model_len, self._warned)
            kwargs = sampling_params_kwargs(sampling, self.eos_token_ids, logprobs=self.config.logprobs)
            requests.append(self._ensure_served(batch.adapter_name))
            params.append(self.vllm.SamplingParams(**kwargs))
            unpadded.append(ids)
        if len({r.lora_int_id for r in requests}) > self.config.max_loras:
            self._warn_once("loras", "one call serves %d adapters but VLLMConfig.max_loras=%d: vLLM runs the others "
                            "after them; raise max_loras for one pass", len(requests), self.config.max_loras)  # fmt: skip
        sizes = [len(ids) for ids in unpadded]
        flat = [{"prompt_token_ids": i.tolist()} for ids in unpadded for i in ids]
        if len(batches) == 1:
            param_arg, lora_arg = params[0], requests[0]
        else:
            param_arg = [p for p, n in zip(params, sizes, strict=True) for _ in range(n)]
            lora_arg = [r for r, n in zip(requests, sizes, strict=True) for _ in range(n)]
        self.wake_up()
        outputs = self.llm.generate(flat, param_arg, lora_request=lora_arg, use_tqdm=False)
        if not self._phases:
            self._sleep()  # no phase calls from the training loop: release the GPU after every call
        results, logps, start = [], [], 0
        for batch, ids, size in zip(batches, unpadded, sizes, strict=True):
            part = outputs[start : start + size]
            start += size
            out = convert_outputs(part, ids, batch.sampling.group_size, self.eos_token_ids, self.pad_token_id)
            results.append(out)
            if self.config.logprobs:
                logps.append(_rollout_logprobs(part, ids, out.action_masks))
        self.last_logprobs = logps if self.config.logprobs else None
        return results

    def close(self) -> None:
        """Shut the engine down, free its GPU memory and delete the adapter folders (idempotent)."""
        llm, self.llm = self.llm, None
        self._adapters.clear()
        _LIVE.discard(self)
        if llm is not None:
            try:
                if self.config.sleep_mode and not self._asleep:
                    llm.sleep(level=2)  # nothing wakes it again: drop weights and KV cache without a CPU copy
                shutdown = getattr(llm, "shutdown", None)  # vLLM PRs #36283/#46023; else the engine core's
                if shutdown is None:
                    shutdown = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", None)
                if shutdown is not None:
                    shutdown()
            except Exception as err:  # noqa: BLE001 - closing must not fail a finished run
                logger.warning("vLLM engine shutdown failed (%s); its memory is freed when the process exits", err)
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self._cleanup()

    def _check_open(self) -> None:
        if self.llm is None:
            raise RuntimeError("this vLLM backend was closed (GRPO.close, or the end of finetune_llm_reasoning: pass "
                               "close_backends=False to keep generating): build a new agent (GRPO(use_vllm=True))")

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)


def convert_outputs(
    outputs: Sequence[Any],
    unpadded: Sequence[Any],
    group_size: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
) -> GenerationOutput:
    """vLLM ``RequestOutput`` objects (one per prompt, ``n`` completions each) to our format.

    Args:
        outputs: ``llm.generate`` results, in prompt order; each has ``.outputs[j].token_ids``.
        unpadded: Each prompt's 1-D ids.
        group_size: Completions per prompt.
        eos_token_ids: Ids that end a completion.
        pad_token_id: Padding id.

    Returns:
        The :class:`GenerationOutput`.

    Raises:
        ValueError: If a prompt got a different number of completions than ``group_size``.
    """
    rows = []
    for i, request in enumerate(outputs):
        if len(request.outputs) != group_size:
            raise ValueError(f"vLLM returned {len(request.outputs)} completions for prompt {i}, expected {group_size}")
        rows.extend(list(c.token_ids) for c in request.outputs)
    return split_completions(unpadded, rows, group_size, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)


def build_vllm_backend(agent: Any, config: VLLMConfig | None = None) -> VLLMBackend:
    """The ``"vllm"`` backend of an agent (:data:`~llm_gym.algorithms.rollout.backend.BACKENDS`).

    Args:
        agent: The GRPO agent.
        config: Engine settings; default ``VLLMConfig()``.

    Returns:
        The backend.
    """
    return VLLMBackend(agent, config if config is not None else VLLMConfig())


def _rollout_logprobs(outputs: Sequence[Any], unpadded: Sequence[Tensor], masks: Sequence[Tensor]) -> list[Tensor]:
    """Per prompt ``[G, L_i + C_i - 1]`` float: each sampled token's vLLM log-prob at its mask position, else 0."""
    result = []
    for request, prompt, mask in zip(outputs, unpadded, masks, strict=True):
        logp = torch.zeros(mask.shape, dtype=torch.float32)
        for g, completion in enumerate(request.outputs):
            for t in range(int(mask[g].sum())):
                entry = completion.logprobs[t][completion.token_ids[t]]
                logp[g, len(prompt) - 1 + t] = float(getattr(entry, "logprob", entry))
        result.append(logp)
    return result


def logprob_drift(trainer_logps: Tensor, rollout_logps: Tensor, mask: Tensor) -> dict[str, float]:
    """How far vLLM's sampled-token log-probs are from the trainer's, over the completion tokens.

    Args:
        trainer_logps: ``[B, T]`` the trainer's log-probs.
        rollout_logps: ``[B, T]`` vLLM's.
        mask: ``[B, T]`` bool, the completion tokens.

    Returns:
        ``mean_abs``, ``max_abs`` (of the difference) and ``tokens`` (how many were compared).
    """
    diff = (trainer_logps.detach().float() - rollout_logps.float())[mask.bool()].abs()
    if diff.numel() == 0:
        return {"mean_abs": 0.0, "max_abs": 0.0, "tokens": 0.0}
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()), "tokens": float(diff.numel())}
