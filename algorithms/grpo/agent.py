"""The GRPO agent: a LoRA adapter on a causal LM, trained with group-relative policy optimisation.

Keeps the constructor and the ``get_action`` / ``learn`` / ``test`` / ``save_checkpoint`` methods of
AgileRL's ``GRPO`` (seed 001), so a script written for it runs with only its imports changed.

The class only wires its parts: the settings are a :class:`~llm_gym.algorithms.grpo.config.GRPOConfig`,
the model helpers live in :mod:`~llm_gym.algorithms.grpo.model`, generation in a backend chosen by
name (:func:`~llm_gym.algorithms.rollout.backend.make_backend`), the update in
:mod:`~llm_gym.algorithms.grpo.update`, evaluation in :mod:`~llm_gym.algorithms.rollout.rollout`
and the checkpoint files in :mod:`~llm_gym.algorithms.grpo.checkpoint`.

Designed for populations: several agents can share ONE base model through PEFT multi-adapter,
each with its own ``adapter_name``, optimizer and hyper-parameters (:meth:`GRPO.clone`). The
reference policy is the same model with adapters disabled, so no second copy of the weights exists.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llm_gym.algorithms.grpo import dynamic, update
from llm_gym.algorithms.grpo.config import FIXED_SETTINGS, GRPOConfig
from llm_gym.algorithms.grpo.model import (
    adapter_params,
    check_pad_token_id,
    copy_adapter,
    load_model,
    resolve_device,
    wrap_peft,
)
from llm_gym.algorithms.plumbing.cpu_allocator import retain_freed_memory
from llm_gym.algorithms.rollout.backend import SamplingConfig, check_backend, generation_budget, make_backend
from llm_gym.algorithms.rollout.completions import MiniBatch
from llm_gym.algorithms.rollout.hf import resolve_eos
from llm_gym.algorithms.rollout.rollout import evaluate

__all__ = ["GRPO"]

logger = logging.getLogger(__name__)


class GRPO:
    """Group Relative Policy Optimisation with a LoRA adapter.

    Args:
        model_name: A local path or hub id of a causal LM, or (leniently) the model object itself.
        actor_network: A model object (``PreTrainedModel`` or ``PeftModel``) instead of ``model_name``.
        pad_token_id: Padding id (seed 001 passes ``tokenizer.eos_token_id``).
        pad_token: The padding token string (kept for AgileRL compatibility and checkpoints).
        lora_config: ``peft.LoraConfig``; default ``r=16, alpha=32, all-linear``.
        config: The agent's settings; ``**hyperparameters`` replace single fields of it.
        accelerator: An ``accelerate.Accelerator``; only its device is used for now.
        use_vllm: Seed 001's switch: ``backend="vllm"`` (CUDA; ``pip install "llm-gym[vllm]"``).
        vllm_config: Seed 001's name for the vLLM engine settings
            (:class:`~llm_gym.algorithms.rollout.vllm.VLLMConfig`) when the backend is vLLM.
        backend_config: The generation backend's own settings (any backend); None for its defaults.
        seed: Seeds torch's global RNG (sampling) when given.
        dtype: Dtype when loading ``model_name`` from a path (default: bf16 on CUDA, fp32 on CPU).
        device: Device; default the accelerator's, else CUDA when available, else CPU.
        eos_token_id: Id(s) that end a completion; default the model's generation config.
        adapter_name: Name of this agent's adapter in the (possibly shared) PEFT model.
        index: The agent's id in a population (kept in checkpoints and lineage).
        **hyperparameters: Fields of :class:`GRPOConfig` (``lr``, ``beta``, ``group_size``,
            ``batch_size``, ``max_model_len``, ``max_output_tokens``, ``loss_type``, ``backend``, ...),
            plus ``clip_coef`` (a float or a ``(low, high)`` pair). Unknown names are refused.

    Attributes:
        hps: The :class:`GRPOConfig` (frozen; change it with :meth:`set_hp`).
        share_prompt_forward: In :meth:`learn`, run each prompt once per mini-batch and share its KV
            cache across the group's completions (:mod:`~llm_gym.algorithms.grpo.logps`).
            True by default; the result equals the per-row pass up to float rounding.
        fuse_lora: In :meth:`learn`'s policy pass, run plain LoRA layers as one in-place ``addmm``
            per layer (:func:`~llm_gym.algorithms.plumbing.lora_swap.fused_lora`); True by default.

    Raises:
        ValueError: On a bad or unknown hyper-parameter, a missing model or a bad ``pad_token_id``.
        ImportError: ``use_vllm=True`` without vLLM installed.
    """

    def __init__(
        self,
        model_name: str | Any | None = None,
        actor_network: Any | None = None,
        pad_token_id: int | None = None,
        pad_token: str | None = None,
        lora_config: Any | None = None,
        *,
        config: GRPOConfig | None = None,
        accelerator: Any | None = None,
        use_vllm: bool = False,
        vllm_config: Any | None = None,
        backend_config: Any | None = None,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        adapter_name: str = "default",
        index: int = 0,
        **hyperparameters: Any,
    ) -> None:
        self.hps = _seed_config(config, use_vllm, hyperparameters)
        if backend_config is None and self.hps.backend == "vllm":
            backend_config = vllm_config  # seed 001's name for the engine settings
        check_backend(self.hps.backend)  # fail before loading any weights
        if seed is not None:
            torch.manual_seed(seed)
        self.seed = seed
        self.accelerator = accelerator
        self.device = resolve_device(device, accelerator)
        if self.device.type == "cpu":
            retain_freed_memory()  # large activations reused, not page-faulted anew each step (cpu_allocator)
        self.adapter_name = adapter_name
        model = actor_network if actor_network is not None else model_name
        if model is None:
            raise ValueError("give model_name (a local path or hub id) or actor_network (a model object)")
        model, self.model_id = load_model(model, self.device, dtype)
        self.pad_token_id, self.pad_token = check_pad_token_id(model, pad_token_id), pad_token
        self.model = wrap_peft(model, lora_config, adapter_name).to(self.device)
        self.eos_token_ids = resolve_eos(self.model, eos_token_id, self.pad_token_id)
        self._activate()
        self.optimizer = self._make_optimizer()

        self.index = index
        self.lineage: list[dict[str, Any]] = []
        self.fitness: list[float] = []
        self.last_eval: dict[str, float] = {}
        self.steps = 0
        self.skipped_updates = 0
        self.mut = "None"
        self._budget_warned = False
        self._weights_dirty = True
        self.share_prompt_forward = True
        self.fuse_lora = True
        if self.hps.vllm_importance_sampling_correction:
            backend_config = _with_logprobs(self.hps.backend, backend_config)
        self.backend_config = backend_config
        self._sampling_logps: dict[int, tuple[Tensor, Tensor]] = {}
        self.backend: Any = make_backend(self.hps.backend, self, backend_config)

    # ------------------------------------------------------------------ setup
    def _activate(self) -> None:
        """Make this agent's adapter the active (and only trainable) one of the shared model."""
        if self.model.active_adapter != self.adapter_name:
            self.model.set_adapter(self.adapter_name)

    def _adapter_params(self) -> list[torch.nn.Parameter]:
        return adapter_params(self.model, self.adapter_name)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = self._adapter_params()
        for p in params:
            p.requires_grad_(True)
        return torch.optim.AdamW(params, lr=self.hps.lr)

    @property
    def max_model_len(self) -> int | None:
        """Context length (prompt + completion), or None."""
        return self.hps.max_model_len

    @property
    def use_vllm(self) -> bool:
        """Whether this agent generates with vLLM (seed 001's flag)."""
        return self.hps.backend == "vllm"

    # ------------------------------------------------------- hyper-parameters
    def get_hp(self, name: str) -> Any:
        """One hyper-parameter (the evolution protocol's reader).

        Args:
            name: A field of :class:`GRPOConfig`, or ``"clip_coef"``.

        Returns:
            Its value (``clip_coef``: one float when symmetric, else ``(low, high)``).

        Raises:
            KeyError: On an unknown name.
        """
        if name not in GRPOConfig.names():
            raise KeyError(f"unknown hyper-parameter {name!r}; valid names are {GRPOConfig.names()}")
        return getattr(self.hps, name)

    def set_hp(self, name: str, value: Any) -> None:
        """Change one hyper-parameter (mutation), keeping the optimizer in sync.

        Args:
            name: A field of :class:`GRPOConfig` other than those of ``FIXED_SETTINGS``
                (``max_model_len``, ``backend``, ``vllm_importance_sampling_correction``: fixed when the
                agent is built), or ``"clip_coef"`` (sets both clip bounds).
            value: The new value.

        Raises:
            ValueError: On an unknown or fixed name, or an invalid value (the old value is kept).
        """
        if name in FIXED_SETTINGS:
            raise ValueError(f"{name} is fixed when the agent is built; build a new agent to change it")
        self.hps = self.hps.replace(**{name: value})
        for group in self.optimizer.param_groups:
            group["lr"] = self.hps.lr

    set_hyperparameter = set_hp

    @property
    def clip_coef(self) -> float | tuple[float, float]:
        """The clip range: one float when symmetric, else ``(low, high)``."""
        return self.hps.clip_coef

    @property
    def lr(self) -> float:
        """Learning rate (setting it updates the optimizer)."""
        return self.hps.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.set_hp("lr", value)

    @property
    def beta(self) -> float:
        """KL coefficient."""
        return self.hps.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self.set_hp("beta", value)

    @property
    def group_size(self) -> int:
        """Completions per prompt."""
        return self.hps.group_size

    @group_size.setter
    def group_size(self, value: int) -> None:
        self.set_hp("group_size", value)

    @property
    def batch_size(self) -> int:
        """Sequences per mini-batch."""
        return self.hps.batch_size

    @property
    def temperature(self) -> float:
        """Sampling temperature."""
        return self.hps.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.set_hp("temperature", value)

    # ------------------------------------------------------------- generation
    def get_action(
        self, prompts: Sequence[dict[str, Any]], training: bool = True, group_size: int | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Generate completions for a batch of prompts, with one generation call for all of them.

        Args:
            prompts: The environment's prompts (``input_ids``/``attention_mask`` ``[1, L_i]``).
            training: True: sample with the agent's settings; False: greedy (evaluation).
            group_size: Completions per prompt; default ``group_size`` when training, else 1.
                The multi-turn rollout asks for 1 per trajectory after the first turn.

        Returns:
            ``(completion_ids, action_masks)``: per prompt ``[G, L_i + C_i]`` ids (prompt then
            completion, right-padded with ``pad_token_id``) and a bool mask ``[G, L_i + C_i - 1]``
            True where the next token is generated (up to and including the first EOS).

        Raises:
            ValueError: On malformed prompts, or a prompt that fills ``max_model_len`` alone.
        """
        sampling = self.prepare_generation(prompts, training, group_size)
        out = self.backend.generate(prompts, sampling, adapter_name=self.adapter_name)
        logps = getattr(self.backend, "last_logprobs", None)
        if training and logps is not None:
            self.remember_sampling_logps(out.completion_ids, logps[0])
        return out.completion_ids, out.action_masks

    def remember_sampling_logps(self, completion_ids: Sequence[Tensor], logps: Sequence[Tensor]) -> None:
        """Keep the backend's log-probs of sampled completions for the importance-sampling correction.

        Kept only with ``vllm_importance_sampling_correction``; :meth:`learn` finds them by the identity
        of each prompt's completion tensor (so experience filtered or refilled per prompt keeps its
        log-probs) and forgets them all afterwards.

        Args:
            completion_ids: Per prompt ``[G, S]`` ids, as returned to the caller.
            logps: Per prompt ``[G, S - 1]`` the sampled tokens' log-probs at their action-mask positions.
        """
        if self.hps.vllm_importance_sampling_correction:
            for ids, logp in zip(completion_ids, logps, strict=True):
                self._sampling_logps[id(ids)] = (ids, logp)

    def sampling_logps_for(self, completion_ids: Sequence[Tensor]) -> list[Tensor] | None:
        """The remembered log-probs of every prompt's completions, or None unless all of them were kept."""
        found = [self._sampling_logps.get(id(ids)) for ids in completion_ids]
        if not found or any(f is None or f[0] is not ids for f, ids in zip(found, completion_ids, strict=True)):
            return None
        return [f[1] for f in found if f is not None]

    def forget_sampling_logps(self) -> None:
        """Drop the remembered sampling log-probs (each :meth:`learn` does, once it planned its update)."""
        self._sampling_logps.clear()

    def prepare_generation(
        self, prompts: Sequence[dict[str, Any]], training: bool = True, group_size: int | None = None
    ) -> SamplingConfig:
        """Activate this agent's adapter, sync its backend if needed, and return its decoding settings.

        What :meth:`get_action` does before generating; a population's batched decode
        (:mod:`~llm_gym.algorithms.rollout.population`) calls it for every agent.

        Args:
            prompts: The prompts about to be decoded (their longest length sets the budget).
            training: Sample with the agent's settings (True) or decode greedily.
            group_size: Completions per prompt; default ``group_size`` when training, else 1.

        Returns:
            The :class:`SamplingConfig`.

        Raises:
            ValueError: On no prompts, or a prompt that fills ``max_model_len`` alone.
        """
        self._activate()
        if not prompts:
            raise ValueError("got no prompts: pass the list that env.reset() / env.step() returned")
        longest = max(int(torch.as_tensor(p["input_ids"]).shape[-1]) for p in prompts)
        if group_size is None:
            group_size = self.hps.group_size if training else 1
        sampling = SamplingConfig(
            group_size=group_size, max_new_tokens=self._budget(longest), greedy=not training,
            temperature=self.hps.temperature, top_p=self.hps.top_p, top_k=self.hps.top_k,
        )  # fmt: skip
        if self._weights_dirty:
            self.backend.sync(self)
            self._weights_dirty = False
        return sampling

    def _budget(self, prompt_len: int) -> int:
        requested = self.hps.max_output_tokens
        # Warn once per agent, not once per batch.
        budget = generation_budget(prompt_len, requested, self.hps.max_model_len, warn=not self._budget_warned)
        self._budget_warned = self._budget_warned or budget < requested
        return budget

    # ----------------------------------------------------------------- update
    def _logps(self, mb: MiniBatch, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        return update.policy_logps(self, mb, entropy)

    def _frozen_logps(self, batches: list[MiniBatch], reference: bool) -> list[Tensor]:
        return update.frozen_logps(self, batches, reference)

    def learn(self, experiences: tuple[Sequence[Tensor], Sequence[Tensor], Tensor]) -> dict[str, float]:
        """One GRPO update on a batch of experience (:func:`~llm_gym.algorithms.grpo.update.learn`).

        Gradients are accumulated over all mini-batches (``batch_size`` sequences each), weighted
        so the result equals the full-batch loss, and the optimizer steps once per update epoch.
        Hence with ``update_epochs == 1`` the samples are exactly on-policy and no old-log-prob
        pass is spent (the ratio is 1); with more epochs old log-probs are computed once up front.
        A non-finite loss or gradient norm skips that epoch's step with a warning.

        Args:
            experiences: ``(completion_ids, action_masks, rewards)`` from :meth:`get_action` and
                ``env.step`` (or a :class:`~llm_gym.algorithms.rollout.rollout.Rollout`'s
                ``experience``); ``rewards`` has shape ``[P, G]``.

        Returns:
            Metrics. AgileRL returned ``(loss, kl)``: here they are ``metrics["loss"]`` and
            ``metrics["loss/kl"]`` (0.0 when ``beta == 0``: the reference pass is skipped). Also
            ``loss/policy``, ``grpo/clip_fraction``, ``grpo/ratio_mean``,
            ``grpo/frac_reward_zero_std``, ``grpo/entropy``, ``completion/length_mean``,
            ``reward/mean``, ``reward/std``, ``grad_norm``, ``grpo/skipped_updates``, ``grpo/lr``, and
            ``grpo/is_ratio_mean`` when ``vllm_importance_sampling_correction`` weighted the loss.
            With ``dynamic_sampling`` the groups whose rewards all tie are dropped first
            (:func:`~llm_gym.algorithms.grpo.dynamic.drop_zero_std`) and
            ``grpo/frac_reward_zero_std`` is their share of the batch given.

        Raises:
            ValueError: On shapes that do not match ``[P, G]``.
        """
        self.backend.sleep()  # the learn phase starts: vLLM releases its GPU memory until the next generation
        if not self.hps.dynamic_sampling:
            return update.learn(self, experiences)
        experiences, zero_std = dynamic.drop_zero_std(experiences)
        return {**update.learn(self, experiences), "grpo/frac_reward_zero_std": zero_std}

    # ------------------------------------------------------------- evaluation
    def test(
        self, env: Any, max_problems: int | None = None, *, split: str = "test", fitness: str = "reward"
    ) -> float:
        """Fitness: greedy completions over a held-out split of the env, scored as ``fitness`` says.

        Every problem of the split is answered exactly once (or the first ``max_problems``, rounded
        up to whole batches), through the same rollout as training
        (:func:`~llm_gym.algorithms.rollout.rollout.evaluate`). The env's training position and
        pending training batch are untouched: ReasoningGym keeps them per split.

        Args:
            env: A :class:`~llm_gym.reasoning_gym.ReasoningGym`, or a multi-turn env of the
                rollout's protocol.
            max_problems: Evaluate at most about this many problems.
            split: ``"test"``, or ``"validation"`` (selection on problems the final table never uses).
            fitness: ``"reward"``: the mean total reward (AgileRL's); ``"accuracy"``: exact accuracy,
                ties broken by total reward (:func:`~llm_gym.algorithms.evolution.fitness.accuracy_fitness`).

        Returns:
            The fitness, also appended to ``self.fitness``; every metric of the evaluation is
            stored in ``self.last_eval``.
        """
        from llm_gym.algorithms.evolution.fitness import fitness_of

        self.last_eval = evaluate(self, env, max_problems, split=split)
        rubric = getattr(env, "rubric", None)
        score = fitness_of(self.last_eval, fitness, getattr(rubric, "max_total", None))
        self.fitness.append(score)
        return score

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path) -> None:
        """Save the agent atomically (temporary sibling folder, then rename) with :meth:`write_checkpoint`.

        Args:
            path: Target folder (replaced if it exists).
        """
        from llm_gym.algorithms.plumbing.atomic import atomic_directory

        with atomic_directory(path) as tmp:
            self.write_checkpoint(tmp)

    def write_checkpoint(self, directory: str | Path) -> None:
        """Write the adapter (a plain PEFT folder), hyper-parameters and optimizer state into ``directory``.

        The folder gets ``adapter_config.json`` + ``adapter_model.safetensors`` (loadable with
        ``PeftModel.from_pretrained(base, path)`` or by vLLM), ``llm_gym_agent.json`` and
        ``optimizer.pt``. Not atomic by itself: usable as ``EliteStore.save``'s ``save_fn``.

        Args:
            directory: An existing folder.
        """
        from llm_gym.algorithms.grpo.checkpoint import write_agent_files

        write_agent_files(self, directory)

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a folder written by :meth:`save_checkpoint` into this agent's adapter.

        Args:
            path: The checkpoint folder.

        Raises:
            FileNotFoundError: If a file is missing.
            ValueError: If the adapter's shape (rank, target modules) differs from this agent's.
        """
        from llm_gym.algorithms.grpo.checkpoint import read_agent_files

        read_agent_files(self, path)
        self._weights_dirty = True

    # ------------------------------------------------------------ populations
    def clone(self, index: int | None = None, adapter_name: str | None = None) -> GRPO:
        """A copy of this agent as a new adapter on the SAME base model (no copy of the base).

        Adapter tensors, optimizer state, hyper-parameters, fitness history and lineage are
        copied; the clone then trains independently.

        Args:
            index: The clone's id in a population (``agent.index``); default this agent's.
            adapter_name: Name of the new adapter; default ``"agent<index>"`` when ``index`` is
                given, else ``"<name>_clone<k>"``.

        Returns:
            The new agent.

        Raises:
            ValueError: If the adapter name is already taken.
        """
        if adapter_name is None and index is not None and f"agent{index}" not in self.model.peft_config:
            adapter_name = f"agent{index}"  # else the first free "<name>_clone<k>"
        adapter_name = copy_adapter(self.model, self.adapter_name, adapter_name)
        new = copy.copy(self)
        new.adapter_name = adapter_name
        new.index = self.index if index is None else int(index)
        new.hps = dataclasses.replace(self.hps)
        new.fitness = list(self.fitness)
        new.lineage = copy.deepcopy(self.lineage)
        new.last_eval = dict(self.last_eval)
        new._weights_dirty = True
        new._sampling_logps = {}
        new._activate()
        new.optimizer = new._make_optimizer()
        new.optimizer.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        self._activate()
        return new

    def close(self) -> None:
        """Shut the generation backend down (vLLM: its engine and GPU memory); idempotent.

        Clones share the backend, so closing one agent closes it for the whole population: call it
        once training and evaluation are over (:func:`~llm_gym.algorithms.run.loop.finetune_llm_reasoning`
        does at its end). With the HF backend nothing is released and the agent keeps working.
        """
        self.backend.close()

    def release(self) -> None:
        """Delete this agent's adapter from the shared model (a discarded population member).

        The agent cannot be used afterwards. The last adapter of a model is kept (PEFT needs one).
        """
        if len(self.model.peft_config) > 1 and self.adapter_name in self.model.peft_config:
            if self.model.active_adapter == self.adapter_name:  # PEFT warns when the active one is deleted
                self.model.set_adapter(next(n for n in self.model.peft_config if n != self.adapter_name))
            self.model.delete_adapter(self.adapter_name)
        self.optimizer.state.clear()


def _seed_config(config: GRPOConfig | None, use_vllm: bool, hyperparameters: dict[str, Any]) -> GRPOConfig:
    """The agent's config from seed 001's keywords: ``config`` with ``hyperparameters`` replaced, and
    ``use_vllm=True`` as ``backend="vllm"``.

    Raises:
        ValueError: On an unknown keyword (listing the valid ones), an invalid value, or ``use_vllm``
            contradicting ``backend``.
    """
    built = GRPOConfig.build(config, **hyperparameters)
    if not use_vllm:
        return built
    if hyperparameters.get("backend", "vllm") != "vllm" or built.backend not in ("hf", "vllm"):
        raise ValueError(f"use_vllm=True contradicts backend={built.backend!r}: give only one of them")
    return dataclasses.replace(built, backend="vllm")


def _with_logprobs(backend: str, config: Any) -> Any:
    """The backend's config with sampled-token log-probs on (the importance-sampling correction needs them)."""
    if backend == "hf":
        logger.warning("vllm_importance_sampling_correction has no effect with backend='hf': it generates with "
                       "the trainer's own weights, there is no engine drift to correct")  # fmt: skip
        return config
    if config is None and backend == "vllm":
        from llm_gym.algorithms.rollout.vllm_engine import VLLMConfig

        return VLLMConfig(logprobs=True)
    if isinstance(config, Mapping):
        return {**config, "logprobs": True}
    if dataclasses.is_dataclass(config) and hasattr(config, "logprobs") and not config.logprobs:
        return dataclasses.replace(config, logprobs=True)
    return config
