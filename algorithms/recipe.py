"""The main job: tiny model -> SFT warm-up -> population GRPO with evolution -> held-out table.

Components live in the library (tasks, SFT, GRPO, evolution, the training loop); this recipe only
wires them, the way ``llm-gym train`` runs them. Every field of :class:`TrainConfig` can be set
from a YAML file or the command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "load_config", "mutation_genes", "run_training"]

logger = logging.getLogger(__name__)

_SFT_WARMUP_STEPS = 20


@dataclass(frozen=True)
class TrainConfig:
    """Everything the main job needs; the defaults are the embedded offline run."""

    task: str = "llm_gym/Countdown-v0"
    """Registered environment id."""
    task_kwargs: dict[str, Any] = field(default_factory=lambda: {"min_numbers": 3, "max_numbers": 3, "max_number": 9,
                                                                  "max_target": 30})
    """Difficulty knobs of the task (its config fields)."""
    model: str | None = None
    """A local path or hub id of a causal LM, a ``.gguf`` file, or ``"smollm2-135m"`` (the ``smollm2`` extra;
    see :func:`llm_gym.models.resolve_model`); ``None`` builds the embedded tiny model. For a pretrained
    model set ``sft_steps=0``: the warm-up is a full fine-tune at ``sft_lr`` meant for the tiny model."""
    tiny_preset: str = "tiny"
    """Preset of the embedded model (``llm_gym.tiny.PRESETS``) when ``model`` is None."""
    sft_steps: int = 80
    """Optimizer steps of the SFT warm-up on oracle solutions (0 skips it). 80 steps teach the tiny
    model the answer format only partly (held-out sampled reward ~0.1 of 2), which leaves GRPO room
    to show; 400 steps reach ~6 % greedy exact accuracy (see ``benchmarks/README.md``, Learning)."""
    sft_examples: int = 2000
    """Oracle examples for the warm-up."""
    sft_lr: float = 3e-3
    """Peak learning rate of the warm-up (full fine-tune)."""
    sft_batch_size: int = 32
    """Examples per warm-up step."""
    population: int = 4
    """Agents in the population (1 = a plain GRPO run, no evolution)."""
    train_size: int = 2000
    """Training problems."""
    test_size: int = 100
    """Held-out problems (fitness and the final table)."""
    prompts_per_step: int = 8
    """Prompts per training step (``data_batch_size_per_gpu``)."""
    group_size: int = 8
    """Completions per prompt."""
    max_output_tokens: int = 48
    """Generation budget per completion."""
    lr: float = 1e-3
    """LoRA learning rate (the initial value; evolution mutates it)."""
    beta: float = 0.0
    """KL coefficient to the SFT model."""
    temperature: float = 1.0
    """Sampling temperature during training."""
    lora_r: int = 16
    """LoRA rank."""
    max_steps: int = 60
    """Training steps (each agent trains on one batch per step)."""
    evo_steps: int = 20
    """Steps between evolutions."""
    evaluation_interval: int = 10
    """Steps between held-out evaluations."""
    output_dir: str | None = None
    """Run folder (default ``runs/<time>``): metrics, elites, checkpoints, plots."""
    resume: str | None = None
    """A checkpoint folder of an earlier run to continue."""
    seed: int = 0
    """Seed of problems, initialisation and evolution."""
    threads: int | None = 1
    """torch intra-op threads (default 1: up to 25x faster for the tiny model on a busy 2-core CPU;
    ``None`` keeps torch's default, better for large models)."""
    sft_cache: bool = True
    """Reuse a cached SFT model of the embedded tiny model trained with exactly this warm-up (key:
    model folder, task, knobs, SFT steps, examples, lr, batch size, seed); reuse is logged."""

    def __post_init__(self) -> None:
        for name in ("population", "train_size", "test_size", "prompts_per_step", "max_output_tokens", "max_steps",
                     "evo_steps", "evaluation_interval", "lora_r"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"TrainConfig.group_size={self.group_size}: GRPO needs at least 2 completions per prompt")
        if self.sft_steps < 0:
            raise ValueError(f"TrainConfig.sft_steps={self.sft_steps} must be >= 0 (0 skips the warm-up)")


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from an optional YAML file, then keyword overrides.

    Raises:
        ValueError: naming an unknown key and the valid ones.
    """
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a train config is a mapping of field: value, got {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown train config key {unknown[0]!r}; valid keys: {', '.join(sorted(valid))}")
    return TrainConfig(**values)


def _sft_model(config: TrainConfig, run_dir: Path) -> tuple[str, Any]:
    """The warm-started model folder and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_gym.algorithms.sft import SFTConfig, length_report, oracle_examples, train_sft
    from llm_gym.models import resolve_model
    from llm_gym.registry import get_task
    from llm_gym.tiny import tiny_model_path

    source = resolve_model(config.model) if config.model else str(tiny_model_path(config.tiny_preset, seed=config.seed))
    tokenizer = AutoTokenizer.from_pretrained(source)
    if config.sft_steps == 0:
        return source, tokenizer
    cache = _sft_cache_dir(config, source) if config.sft_cache and config.model is None else None
    if cache is not None and (cache / "config.json").is_file():
        logger.info("SFT warm-up reused from cache %s (identical model, task, knobs and SFT settings; "
                    "set sft_cache=False to train it again)", cache)  # fmt: skip
        return str(cache), tokenizer
    task = get_task(config.task)
    model = AutoModelForCausalLM.from_pretrained(source)
    examples = oracle_examples(task, tokenizer, size=config.sft_examples, seed=config.seed + 1, **config.task_kwargs)
    report = length_report(examples, tokenizer, seq_len=512)
    logger.info("SFT data: %d examples, longest %d tokens", len(examples), report.max_length)
    sft = SFTConfig(max_steps=config.sft_steps, lr=config.sft_lr, batch_size=config.sft_batch_size,
                    warmup_steps=_SFT_WARMUP_STEPS, seed=config.seed, progress=True)  # fmt: skip
    result = train_sft(model, tokenizer, examples, sft)
    logger.info("SFT: %d steps in %.1fs, final loss %.3f", result.steps, result.seconds, result.losses[-1])
    out = run_dir / "sft_model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if cache is not None:
        tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
        shutil.copytree(out, tmp)
        try:
            tmp.rename(cache)
        except OSError:  # another run cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out), tokenizer


def _sft_cache_dir(config: TrainConfig, source: str) -> Path:
    """Cache folder of the SFT model, keyed on every input that changes it.

    The embedded model's folder name carries a hash of its preset, so ``source`` identifies the
    starting weights.
    """
    key = json.dumps([source, config.task, sorted(config.task_kwargs.items()), config.sft_steps, config.sft_examples,
                      config.sft_lr, config.sft_batch_size, config.seed, _SFT_WARMUP_STEPS, "v1"])  # fmt: skip
    root = Path(os.environ["LLM_GYM_CACHE"]) if os.environ.get("LLM_GYM_CACHE") else Path.home() / ".cache" / "llm_gym"
    return root / f"sft-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _resumed_run_dir(resume: str | None) -> Path | None:
    """The run folder of a checkpoint (``<run>/checkpoints[/latest]``): a resumed run keeps writing there."""
    if not resume:
        return None
    for folder in (Path(resume), *Path(resume).resolve().parents):
        if (folder / "config.json").is_file() and (folder / "checkpoints").is_dir():
            return folder
    return None


def mutation_genes(beta: float) -> Any:
    """The genes the main job mutates: :meth:`HyperparameterConfig.default`, ``beta`` only when it starts positive.

    A log-scale gene cannot move away from 0, and ``beta == 0`` skips the reference pass, which a
    mutation would silently turn on.

    Args:
        beta: The run's initial KL coefficient.

    Returns:
        A ``HyperparameterConfig`` for :class:`~llm_gym.algorithms.evolution.mutation.Mutations`.
    """
    from llm_gym.algorithms.evolution.genes import HyperparameterConfig

    genes = HyperparameterConfig.default()
    return genes if beta > 0 else genes.without("beta")


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Run the main job and return its summary (also written to ``<run>/summary.json``).

    Returns:
        ``{"sft": eval metrics, "elite": eval metrics, "seconds": ..., "run_dir": ...}``.
    """
    import torch
    from peft import LoraConfig

    from llm_gym.algorithms.evolution.mutation import Mutations
    from llm_gym.algorithms.evolution.selection import TournamentSelection
    from llm_gym.algorithms.grpo.population import create_population
    from llm_gym.algorithms.run.loop import finetune_llm_reasoning
    from llm_gym.models import lora_target_modules
    from llm_gym.reasoning_gym import ReasoningGym

    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    run_dir = Path(config.output_dir or _resumed_run_dir(config.resume) or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))

    model_path, tokenizer = _sft_model(config, run_dir)
    env = ReasoningGym.from_task(config.task, tokenizer, train_size=config.train_size, test_size=config.test_size,
                                 seed=config.seed, data_batch_size_per_gpu=config.prompts_per_step,
                                 **config.task_kwargs)  # fmt: skip
    lora = LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules=lora_target_modules(model_path),
                      task_type="CAUSAL_LM", lora_dropout=0.0)  # fmt: skip
    pop = create_population(
        config.population, model_name=model_path, pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token,
        lora_config=lora, batch_size=config.prompts_per_step * config.group_size, group_size=config.group_size,
        max_output_tokens=config.max_output_tokens, lr=config.lr, beta=config.beta, temperature=config.temperature,
        seed=config.seed,
    )  # fmt: skip
    # LoRA's B matrices start at zero: every agent is still exactly the SFT model here.
    pop[0].test(env)
    sft_eval = dict(pop[0].last_eval)
    for agent in pop:
        agent.fitness.clear()
    logger.info("SFT model on %d held-out problems: %s", config.test_size, sft_eval)

    evolve = config.population > 1
    pop = finetune_llm_reasoning(
        pop, env,
        evo_steps=config.evo_steps if evolve else None,
        tournament=TournamentSelection(2, True, config.population, rand_seed=config.seed) if evolve else None,
        mutation=Mutations(no_mutation=0.2, rl_hp=0.8, mutation_sd=0.1, rand_seed=config.seed,
                           hp_config=mutation_genes(config.beta)) if evolve else None,
        evaluation_interval=config.evaluation_interval, max_steps=config.max_steps,
        elite_path=str(run_dir / "elites"), checkpoint_path=str(run_dir / "checkpoints"), resume_from=config.resume,
        log_dir=str(run_dir), max_reward=env.rubric.max_total,
    )  # fmt: skip
    best = max(pop, key=lambda a: a.fitness[-1] if a.fitness else float("-inf"))
    if not best.fitness:
        best.test(env)
    summary = {
        "task": config.task,
        "sft": sft_eval,
        "elite": dict(best.last_eval),
        "elite_hyperparameters": dataclasses.asdict(best.hps),
        "seconds": time.perf_counter() - start,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
