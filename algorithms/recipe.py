"""The main job: tiny model -> SFT warm-up -> population GRPO with evolution -> held-out table.

Components live in the library (tasks, SFT, GRPO, evolution, the training loop); this recipe only
wires them, the way ``llm-gym train`` runs them. Every field of :class:`TrainConfig` can be set
from a YAML file or the command line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "load_config", "run_training", "held_out_table"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything the main job needs; the defaults are the embedded offline run."""

    task: str = "llm_gym/Countdown-v0"
    """Registered environment id."""
    task_kwargs: dict[str, Any] = field(default_factory=lambda: {"min_numbers": 3, "max_numbers": 3, "max_number": 9,
                                                                  "max_target": 30})
    """Difficulty knobs of the task (its config fields)."""
    model: str | None = None
    """A local path or hub id of a causal LM; ``None`` builds the embedded tiny model."""
    tiny_preset: str = "tiny"
    """Preset of the embedded model (``llm_gym.tiny.PRESETS``) when ``model`` is None."""
    sft_steps: int = 300
    """Optimizer steps of the SFT warm-up on oracle solutions (0 skips it)."""
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
    threads: int | None = None
    """torch intra-op threads (default: torch's)."""

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
    from llm_gym.registry import get_task
    from llm_gym.tiny import tiny_model_path

    source = config.model or str(tiny_model_path(config.tiny_preset, seed=config.seed))
    tokenizer = AutoTokenizer.from_pretrained(source)
    if config.sft_steps == 0:
        return source, tokenizer
    task = get_task(config.task)
    model = AutoModelForCausalLM.from_pretrained(source)
    examples = oracle_examples(task, tokenizer, size=config.sft_examples, seed=config.seed + 1, **config.task_kwargs)
    report = length_report(examples, tokenizer, seq_len=512)
    logger.info("SFT data: %d examples, longest %d tokens", len(examples), report.max_length)
    result = train_sft(model, tokenizer, examples, SFTConfig(max_steps=config.sft_steps, lr=config.sft_lr,
                                                             batch_size=config.sft_batch_size, warmup_steps=20,
                                                             seed=config.seed, progress=True))  # fmt: skip
    logger.info("SFT: %d steps in %.1fs, final loss %.3f", result.steps, result.seconds, result.losses[-1])
    out = run_dir / "sft_model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out), tokenizer


def held_out_table(rows: dict[str, dict[str, float]]) -> str:
    """Format ``{model: eval metrics}`` as the final table (reward parts and exact accuracy)."""
    from llm_gym.cli import format_table

    keys = sorted({k for m in rows.values() for k in m if k.startswith("reward/") and k != "reward/failures"})
    header = ["model", *(k.removeprefix("reward/") for k in keys), "exact accuracy"]
    body = [[name, *(m.get(k, float("nan")) for k in keys), m.get("accuracy", float("nan"))] for name, m in rows.items()]
    return format_table(body, header)


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Run the main job and return its summary (also written to ``<run>/summary.json``).

    Returns:
        ``{"sft": eval metrics, "elite": eval metrics, "seconds": ..., "run_dir": ...}``.
    """
    import torch
    from peft import LoraConfig

    from llm_gym.algorithms.evolution import Mutations, TournamentSelection
    from llm_gym.algorithms.population import create_population
    from llm_gym.algorithms.training import finetune_llm_reasoning
    from llm_gym.reasoning_gym import ReasoningGym

    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    run_dir = Path(config.output_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))

    model_path, tokenizer = _sft_model(config, run_dir)
    env = ReasoningGym.from_task(config.task, tokenizer, train_size=config.train_size, test_size=config.test_size,
                                 seed=config.seed, data_batch_size_per_gpu=config.prompts_per_step,
                                 **config.task_kwargs)  # fmt: skip
    lora = LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules="all-linear",
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
        mutation=Mutations(no_mutation=0.2, rl_hp=0.8, mutation_sd=0.1, rand_seed=config.seed) if evolve else None,
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
