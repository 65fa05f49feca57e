"""The GRPO agent: a LoRA adapter on a causal LM, trained with group-relative policy optimisation.

Keeps the constructor and the ``get_action`` / ``learn`` / ``test`` / ``save_checkpoint`` methods of
AgileRL's ``GRPO`` (seed 001), so a script written for it runs with only its imports changed.

Designed for populations: several agents can share ONE base model through PEFT multi-adapter,
each with its own ``adapter_name``, optimizer and hyper-parameters (:meth:`GRPO.clone`). The
reference policy is the same model with adapters disabled, so no second copy of the weights exists.

Defaults (TRL / AgileRL conventions, tuned for LoRA): ``lr=5e-5`` (LoRA needs a larger step than
full fine-tuning's ~1e-6), ``beta=0.04``, ``clip_coef=0.2``, ``group_size=8``, ``temperature=1.0``,
``top_p=1.0``, ``top_k=0`` (off), ``max_output_tokens=1024``, ``max_grad_norm=1.0``,
``update_epochs=1``, ``loss_type="grpo"``, ``scale_rewards=True``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llm_gym.algorithms.grpo.config import (
    GRPOHyperParams,
    check_pad_token_id,
    clip_pair,
    default_lora_config,
    resolve_device,
)
from llm_gym.algorithms.grpo.logps import completion_logps
from llm_gym.algorithms.grpo.loss import group_advantages, grpo_loss
from llm_gym.algorithms.plumbing.cpu_allocator import retain_freed_memory
from llm_gym.algorithms.plumbing.lora_swap import base_model_only, fused_lora
from llm_gym.algorithms.rollout.backend import SamplingConfig, generation_budget
from llm_gym.algorithms.rollout.completions import MiniBatch, mini_batches, pack_completions, select_rows
from llm_gym.algorithms.rollout.evaluation import held_out_metrics
from llm_gym.algorithms.rollout.hf import HFGenerationBackend

__all__ = ["GRPO", "GRPOHyperParams"]

logger = logging.getLogger(__name__)


class GRPO:
    """Group Relative Policy Optimisation with a LoRA adapter.

    Args:
        model_name: A local path or hub id of a causal LM, or (leniently) the model object itself.
        actor_network: A model object (``PreTrainedModel`` or ``PeftModel``) instead of ``model_name``.
        pad_token_id: Padding id (seed 001 passes ``tokenizer.eos_token_id``).
        pad_token: The padding token string (kept for AgileRL compatibility and checkpoints).
        lora_config: ``peft.LoraConfig``; default ``r=16, alpha=32, all-linear``.
        batch_size: Sequences per mini-batch in :meth:`learn`.
        max_model_len: Context length (prompt + completion). When a prompt plus
            ``max_output_tokens`` does not fit, the batch's generation budget is cut to fit, with a
            warning (once); a prompt that fills the context alone raises ``ValueError``.
        group_size: Completions per prompt (>= 2).
        accelerator: An ``accelerate.Accelerator``; only its device is used for now.
        use_vllm: Generate with vLLM (CUDA; ``pip install "llm-gym[vllm]"``).
        vllm_config: :class:`~llm_gym.algorithms.vllm_backend.VLLMConfig`.
        lr, beta, clip_coef, max_grad_norm, update_epochs, temperature, top_p, top_k, max_output_tokens,
        loss_type, scale_rewards: See :class:`GRPOHyperParams`; ``clip_coef`` is a float or a
            ``(low, high)`` pair.
        seed: Seeds torch's global RNG (sampling) when given.
        dtype: Dtype when loading ``model_name`` from a path (default: bf16 on CUDA, fp32 on CPU).
        device: Device; default the accelerator's, else CUDA when available, else CPU.
        eos_token_id: Id(s) that end a completion; default the model's generation config.
        adapter_name: Name of this agent's adapter in the (possibly shared) PEFT model.
        index: The agent's id in a population (kept in checkpoints and lineage).

    Attributes:
        share_prompt_forward: In :meth:`learn`, run each prompt once per mini-batch and share its KV
            cache across the group's completions (:mod:`~llm_gym.algorithms.grpo.logps`).
            True by default; the result equals the per-row pass up to float rounding.
        fuse_lora: In :meth:`learn`'s policy pass, run plain LoRA layers as one in-place ``addmm``
            per layer (:func:`~llm_gym.algorithms.lora_swap.fused_lora`); True by default.

    Raises:
        ValueError: On a bad hyper-parameter, a missing model or a bad ``pad_token_id``.
        ImportError: ``use_vllm=True`` without vLLM installed.
    """

    def __init__(
        self,
        model_name: str | Any | None = None,
        actor_network: Any | None = None,
        pad_token_id: int | None = None,
        pad_token: str | None = None,
        lora_config: Any | None = None,
        batch_size: int = 16,
        max_model_len: int | None = None,
        group_size: int = 8,
        accelerator: Any | None = None,
        use_vllm: bool = False,
        vllm_config: Any | None = None,
        *,
        lr: float = 5e-5,
        beta: float = 0.04,
        clip_coef: float | Sequence[float] = 0.2,
        max_grad_norm: float = 1.0,
        update_epochs: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_output_tokens: int = 1024,
        loss_type: str = "grpo",
        scale_rewards: bool = True,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        adapter_name: str = "default",
        index: int = 0,
    ) -> None:
        clip_low, clip_high = clip_pair(clip_coef)
        self.hps = GRPOHyperParams(
            lr=lr, beta=beta, clip_low=clip_low, clip_high=clip_high, group_size=group_size,
            batch_size=batch_size, max_grad_norm=max_grad_norm, update_epochs=update_epochs,
            temperature=temperature, top_p=top_p, top_k=top_k, max_output_tokens=max_output_tokens,
            loss_type=loss_type, scale_rewards=scale_rewards,
        )  # fmt: skip
        self.hps.validate()
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"max_model_len={max_model_len} must be >= 2 (prompt + at least one token) or None")
        if seed is not None:
            torch.manual_seed(seed)
        self.seed = seed
        self.max_model_len = max_model_len
        self.accelerator = accelerator
        self.device = resolve_device(device, accelerator)
        if self.device.type == "cpu":
            retain_freed_memory()  # large activations reused, not page-faulted anew each step (cpu_allocator)
        self.adapter_name = adapter_name
        self.use_vllm = use_vllm
        self.vllm_config = vllm_config

        if use_vllm:  # fail before loading any weights
            from llm_gym.algorithms.rollout.vllm import import_vllm

            import_vllm()
        model = actor_network if actor_network is not None else model_name
        if model is None:
            raise ValueError("give model_name (a local path or hub id) or actor_network (a model object)")
        self.model_id = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            if dtype is None:
                dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        self.pad_token_id, self.pad_token = check_pad_token_id(model, pad_token_id), pad_token
        self.model = self._wrap_peft(model, lora_config).to(self.device)
        self.eos_token_ids = self._resolve_eos(eos_token_id)
        self._activate()
        self.optimizer = self._make_optimizer()

        self.index = index
        self.lineage: list[dict[str, Any]] = []
        self.fitness: list[float] = []
        self.last_eval: dict[str, float] = {}
        self.steps = 0
        self.skipped_updates = 0
        self._budget_warned = False
        self._weights_dirty = True
        self.share_prompt_forward = True
        self.fuse_lora = True
        if use_vllm:
            from llm_gym.algorithms.rollout.vllm import VLLMBackend, VLLMConfig

            self.vllm_config = vllm_config if vllm_config is not None else VLLMConfig()
            self.backend: Any = VLLMBackend(self, self.vllm_config)
        else:
            self.backend = HFGenerationBackend(self.model, self.pad_token_id, self.eos_token_ids)

    # ------------------------------------------------------------------ setup
    def _wrap_peft(self, model: Any, lora_config: Any) -> Any:
        from peft import PeftModel, get_peft_model

        if isinstance(model, PeftModel):
            if self.adapter_name not in model.peft_config:
                model.add_adapter(self.adapter_name, lora_config or default_lora_config())
            return model
        if not hasattr(model, "generate"):
            raise ValueError(
                f"the model must be a causal LM with generate() (e.g. AutoModelForCausalLM), got {type(model).__name__}"
            )
        return get_peft_model(model, lora_config or default_lora_config(), adapter_name=self.adapter_name)

    def _resolve_eos(self, eos_token_id: int | Sequence[int] | None) -> list[int]:
        if eos_token_id is None:
            for source in (getattr(self.model, "generation_config", None), getattr(self.model, "config", None)):
                eos_token_id = getattr(source, "eos_token_id", None)
                if eos_token_id is not None:
                    break
        if eos_token_id is None:
            warnings.warn(
                "no eos_token_id given or found in the model config: using pad_token_id as EOS",
                stacklevel=3,
            )
            eos_token_id = self.pad_token_id
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        return [int(i) for i in ids]

    def _activate(self) -> None:
        """Make this agent's adapter the active (and only trainable) one of the shared model."""
        if self.model.active_adapter != self.adapter_name:
            self.model.set_adapter(self.adapter_name)

    def _adapter_params(self) -> list[torch.nn.Parameter]:
        marker = f".{self.adapter_name}."
        params = [p for n, p in self.model.named_parameters() if marker in n]
        if not params:
            raise ValueError(f"adapter {self.adapter_name!r} has no parameters in the model")
        return params

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = self._adapter_params()
        for p in params:
            p.requires_grad_(True)
        return torch.optim.AdamW(params, lr=self.hps.lr)

    # ------------------------------------------------------- hyper-parameters
    def set_hyperparameter(self, name: str, value: Any) -> None:
        """Change one hyper-parameter (mutation), keeping the optimizer in sync.

        Args:
            name: A field of :class:`GRPOHyperParams`, or ``"clip_coef"`` (sets both clip bounds).
            value: The new value.

        Raises:
            ValueError: On an unknown name or an invalid value (the old value is kept).
        """
        if name == "clip_coef":
            low, high = clip_pair(value)
            new = dataclasses.replace(self.hps, clip_low=low, clip_high=high)
        elif name in {f.name for f in dataclasses.fields(GRPOHyperParams)}:
            new = dataclasses.replace(self.hps, **{name: value})
        else:
            valid = [f.name for f in dataclasses.fields(GRPOHyperParams)] + ["clip_coef"]
            raise ValueError(f"unknown hyper-parameter {name!r}; valid names are {valid}")
        new.validate()
        self.hps = new
        for group in self.optimizer.param_groups:
            group["lr"] = self.hps.lr

    def set_hp(self, name: str, value: Any) -> None:
        """Alias of :meth:`set_hyperparameter` (the evolution protocol's name)."""
        self.set_hyperparameter(name, value)

    @property
    def clip_coef(self) -> float | tuple[float, float]:
        """The clip range: one float when symmetric, else ``(low, high)``."""
        low, high = self.hps.clip_low, self.hps.clip_high
        return low if low == high else (low, high)

    @property
    def lr(self) -> float:
        """Learning rate (setting it updates the optimizer)."""
        return self.hps.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.set_hyperparameter("lr", value)

    @property
    def beta(self) -> float:
        """KL coefficient."""
        return self.hps.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self.set_hyperparameter("beta", value)

    @property
    def group_size(self) -> int:
        """Completions per prompt."""
        return self.hps.group_size

    @group_size.setter
    def group_size(self, value: int) -> None:
        self.set_hyperparameter("group_size", value)

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
        self.set_hyperparameter("temperature", value)

    # ------------------------------------------------------------- generation
    def get_action(
        self, prompts: Sequence[dict[str, Any]], training: bool = True
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Generate completions for a batch of prompts, with one generation call for all of them.

        Args:
            prompts: The environment's prompts (``input_ids``/``attention_mask`` ``[1, L_i]``).
            training: True: sample ``group_size`` completions per prompt; False: one greedy
                completion per prompt (evaluation).

        Returns:
            ``(completion_ids, action_masks)``: per prompt ``[G, L_i + C_i]`` ids (prompt then
            completion, right-padded with ``pad_token_id``) and a bool mask ``[G, L_i + C_i - 1]``
            True where the next token is generated (up to and including the first EOS).

        Raises:
            ValueError: On malformed prompts, or a prompt that fills ``max_model_len`` alone.
        """
        self._activate()
        if not prompts:
            raise ValueError("got no prompts: pass the list that env.reset() / env.step() returned")
        longest = max(int(torch.as_tensor(p["input_ids"]).shape[-1]) for p in prompts)
        budget = self._budget(longest)
        sampling = SamplingConfig(
            group_size=self.hps.group_size if training else 1, max_new_tokens=budget, greedy=not training,
            temperature=self.hps.temperature, top_p=self.hps.top_p, top_k=self.hps.top_k,
        )  # fmt: skip
        if self._weights_dirty:
            self.backend.sync(self)
            self._weights_dirty = False
        out = self.backend.generate(prompts, sampling, adapter_name=self.adapter_name)
        return out.completion_ids, out.action_masks

    def _budget(self, prompt_len: int) -> int:
        requested = self.hps.max_output_tokens
        # Warn once per agent, not once per batch.
        budget = generation_budget(prompt_len, requested, self.max_model_len, warn=not self._budget_warned)
        self._budget_warned = self._budget_warned or budget < requested
        return budget

    # ----------------------------------------------------------------- update
    def _logps(self, mb: MiniBatch, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        return completion_logps(self.model, mb, entropy=entropy, share_prompt=self.share_prompt_forward)

    @torch.no_grad()
    def _frozen_logps(self, batches: list[MiniBatch], reference: bool) -> list[Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            if reference:
                with base_model_only(self.model):  # = disable_adapter(), without PEFT's wrappers
                    return [self._logps(mb)[0] for mb in batches]
            return [self._logps(mb)[0] for mb in batches]
        finally:
            self.model.train(was_training)

    def learn(self, experiences: tuple[Sequence[Tensor], Sequence[Tensor], Tensor]) -> dict[str, float]:
        """One GRPO update on a batch of experience.

        Gradients are accumulated over all mini-batches (``batch_size`` sequences each), weighted
        so the result equals the full-batch loss, and the optimizer steps once per update epoch.
        Hence with ``update_epochs == 1`` the samples are exactly on-policy and no old-log-prob
        pass is spent (the ratio is 1); with more epochs old log-probs are computed once up front.
        A non-finite loss or gradient norm skips that epoch's step with a warning.

        Args:
            experiences: ``(completion_ids, action_masks, rewards)`` from :meth:`get_action` and
                ``env.step``; ``rewards`` has shape ``[P, G]``.

        Returns:
            Metrics. AgileRL returned ``(loss, kl)``: here they are ``metrics["loss"]`` and
            ``metrics["loss/kl"]`` (0.0 when ``beta == 0``: the reference pass is skipped). Also
            ``loss/policy``, ``grpo/clip_fraction``, ``grpo/ratio_mean``,
            ``grpo/frac_reward_zero_std``, ``grpo/entropy``, ``completion/length_mean``,
            ``reward/mean``, ``reward/std``, ``grad_norm``, ``grpo/skipped_updates``, ``grpo/lr``.

        Raises:
            ValueError: On shapes that do not match ``[P, G]``.
        """
        completion_ids, action_masks, rewards = experiences
        rewards = torch.as_tensor(rewards, dtype=torch.float32)
        if rewards.dim() != 2 or rewards.shape[0] != len(completion_ids):
            raise ValueError(
                f"rewards must be [P, G] with P = {len(completion_ids)} prompts, got shape {tuple(rewards.shape)}"
            )
        group = rewards.shape[1]
        self._activate()
        advantages, adv_metrics = group_advantages(rewards, scale=self.hps.scale_rewards)  # [P, G]
        advantages = advantages.reshape(-1)  # [B], prompt-major like the packed rows
        packed = pack_completions(completion_ids, action_masks, group, self.pad_token_id)
        # Normalisers count every sequence, trained on or not, so dropping rows below changes nothing.
        total_seqs = packed.ids.shape[0]
        total_tokens = max(int(packed.mask.sum()), 1)
        length_mean = float(packed.mask.sum(dim=1).float().mean())
        if self.hps.beta == 0:
            # With no KL term a zero advantage means a zero gradient: skip those rows' forward and
            # backward (groups whose rewards all tie). Their loss and clip fraction are exactly 0.
            trained = advantages != 0  # [B]
            packed, advantages = select_rows(packed, trained), advantages[trained]
        batches = mini_batches(packed, self.hps.batch_size, self.device) if packed.ids.shape[0] else []
        weights, advs = [], []
        for mb in batches:
            # Weight making the sum over mini-batches equal the full-batch normalisation.
            dapo = self.hps.loss_type == "dapo"
            weights.append(mb.mask.sum().item() / total_tokens if dapo else mb.ids.shape[0] / total_seqs)
            advs.append(advantages[mb.rows].to(self.device))

        ref = self._frozen_logps(batches, reference=True) if self.hps.beta > 0 else [None] * len(batches)
        old = self._frozen_logps(batches, reference=False) if self.hps.update_epochs > 1 else [None] * len(batches)

        sums: dict[str, float] = {}
        grad_norms, skipped = [], 0
        entropy_sum, entropy_tokens = 0.0, 0
        params = self._adapter_params()
        self.model.train()
        fused = fused_lora(self.model) if self.fuse_lora else contextlib.nullcontext()
        with fused:  # the LoRA layers as in-place addmm for forward and backward (lora_swap)
            for epoch in range(self.hps.update_epochs):
                self.optimizer.zero_grad(set_to_none=True)
                finite = True
                for mb, weight, adv, ref_logp, old_logp in zip(batches, weights, advs, ref, old, strict=True):
                    logp, ent = self._logps(mb, entropy=epoch == 0)
                    out = grpo_loss(
                        logp, old_logp, ref_logp, adv, mb.mask, beta=self.hps.beta,
                        clip_low=self.hps.clip_low, clip_high=self.hps.clip_high, loss_type=self.hps.loss_type,
                        max_completion_length=self.hps.max_output_tokens,
                    )  # fmt: skip
                    if not torch.isfinite(out.loss):
                        finite = False
                        break
                    (out.loss * weight).backward()
                    for key, value in {"loss": out.loss.item(), **out.metrics}.items():
                        sums[key] = sums.get(key, 0.0) + value * weight / self.hps.update_epochs
                    if ent is not None:
                        entropy_sum += float(ent[mb.mask].sum())
                        entropy_tokens += int(mb.mask.sum())
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.hps.max_grad_norm)) if finite else math.nan
                if not finite or not math.isfinite(grad_norm):
                    skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    warnings.warn(
                        f"GRPO update skipped at step {self.steps} (epoch {epoch}): non-finite "
                        f"{'loss' if not finite else 'gradient norm'}; counted in grpo/skipped_updates",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    continue
                grad_norms.append(grad_norm)
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.skipped_updates += skipped
        self._weights_dirty = True

        # The losses are full-batch objectives (skipped rows add exactly 0); the other per-token
        # metrics (clip fractions, ratio, KL) describe the rows actually trained on.
        kept = sum(weights)
        metrics = {key: (value if key in ("loss", "loss/policy") or not kept else value / kept)
                   for key, value in sums.items() if key not in adv_metrics}  # fmt: skip
        if not batches:
            metrics.update({"loss": 0.0, "loss/policy": 0.0, "grpo/clip_fraction": 0.0, "grpo/ratio_mean": 1.0})
        metrics.setdefault("loss/kl", 0.0)
        metrics.update(adv_metrics)
        metrics["completion/length_mean"] = length_mean
        metrics["grpo/entropy"] = entropy_sum / entropy_tokens if entropy_tokens else math.nan  # trained rows
        metrics["grpo/trained_fraction"] = packed.ids.shape[0] / total_seqs
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
        metrics["grpo/skipped_updates"] = float(skipped)
        metrics["grpo/lr"] = self.hps.lr
        return metrics

    # ------------------------------------------------------------- evaluation
    def test(self, env: Any, max_problems: int | None = None) -> float:
        """Fitness: mean total reward of greedy completions over the env's test split.

        Every test problem is answered exactly once (or the first ``max_problems``, rounded up to
        whole batches). The env's training position and pending training batch are untouched:
        ReasoningGym keeps them per split.

        Args:
            env: A :class:`~llm_gym.reasoning_gym.ReasoningGym` (or an env with ``eval_mode``,
                ``reset``, ``step`` and ``last_metrics``).
            max_problems: Evaluate at most about this many problems.

        Returns:
            The fitness, also appended to ``self.fitness``; the weighted mean of the env's
            ``last_metrics()`` is stored in ``self.last_eval``.
        """
        self.last_eval = held_out_metrics(self, env, max_problems)
        score = self.last_eval.get("reward/total", math.nan)
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
    @classmethod
    def population(cls, size: int, **kwargs: Any) -> list[GRPO]:
        """``size`` agents on one shared base model (see :func:`~llm_gym.algorithms.population.create_population`)."""
        from llm_gym.algorithms.grpo.population import create_population

        return create_population(size, **kwargs)

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
        from llm_gym.algorithms.grpo.population import copy_adapter

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
        new._activate()
        new.optimizer = new._make_optimizer()
        new.optimizer.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        self._activate()
        return new

    def release(self) -> None:
        """Delete this agent's adapter from the shared model (a discarded population member).

        The agent cannot be used afterwards. The last adapter of a model is kept (PEFT needs one).
        """
        if len(self.model.peft_config) > 1 and self.adapter_name in self.model.peft_config:
            if self.model.active_adapter == self.adapter_name:  # PEFT warns when the active one is deleted
                self.model.set_adapter(next(n for n in self.model.peft_config if n != self.adapter_name))
            self.model.delete_adapter(self.adapter_name)
        self.optimizer.state.clear()
