"""The main job's settings: :class:`TrainConfig` (every field settable from YAML or the command line)
and :func:`load_config`, which reads them and checks them before any work.

Kept apart from :mod:`~llm_gym.algorithms.recipe` so the modules the recipe calls (the run checks,
the SFT warm-up) can name the type without importing the recipe back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_gym.algorithms.run.resume import find_resume_point, merge_resumed_config
from llm_gym.usage import UsageError, check_field_types

__all__ = ["DEMO_TASK_KWARGS", "TrainConfig", "load_config"]


DEMO_TASK_KWARGS: dict[str, dict[str, Any]] = {
    "llm_gym/Countdown-v0": {"min_numbers": 3, "max_numbers": 3, "max_number": 9, "max_target": 30},
}
"""The knobs a task gets when ``task_kwargs`` is not set; a task not listed gets its own defaults."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything the main job needs; the defaults are the embedded offline run."""

    task: str = "llm_gym/Countdown-v0"
    """Registered environment id."""
    task_kwargs: dict[str, Any] | None = None
    """Difficulty knobs of the task (its config fields); ``None``: the task's demo knobs
    (:data:`DEMO_TASK_KWARGS`, small Countdown problems the tiny model can learn), else none."""
    model: str | None = None
    """A local path or hub id of a causal LM, a ``.gguf`` file, or ``"smollm2-135m"`` (the ``smollm2`` extra;
    see :func:`llm_gym.models.resolve_model`); ``None`` builds the embedded tiny model. For a pretrained
    model set ``sft_steps=0``: the warm-up is a full fine-tune at ``sft_lr`` meant for the tiny model."""
    tiny_preset: str = "tiny"
    """Preset of the embedded model (``llm_gym.tiny.PRESETS``) when ``model`` is None."""
    sft_steps: int = 1200
    """Optimizer steps of the SFT warm-up (0 skips it; the cap when ``sft_stop_band`` is set). With the
    default weak teacher, 1200 steps give a student that writes the oracle's trace but, greedily, the
    teacher's last-step answer: 0-1 % held-out greedy exact accuracy; GRPO then takes it to 22-32 %
    (seeds 0-2; 800 steps left seed 1 a student RL could only take to 5.5 %: ``benchmarks/README.md``, Learning)."""
    sft_examples: int = 4000
    """Oracle examples for the warm-up."""
    sft_dataset: str | None = None
    """A saved dataset of chat rollouts (``llm-gym eval --save-dataset``, then ``llm-gym data filter``) to
    warm up on instead of the task's oracle solutions (needed for a task without an oracle)."""
    sft_teacher: dict[str, float] | None = None
    """Habit probabilities of the weak teacher that writes the warm-up data instead of the exact
    oracle (:class:`llm_gym.tasks.countdown_teacher.WeakTeacher`, Countdown only). ``None`` (the
    default): ``{"last_step": 0.6}`` for Countdown (60 % of its answers are only the trace's last
    step), ``{}`` (the exact oracle) for every other task. A stand-in for distilled data from a
    weaker model: the student copies the habit, the verifier can train it away."""
    sft_stop_band: list[float] | None = None
    """``[low, high]``: stop the warm-up once greedy exact accuracy on ``sft_check_problems``
    validation problems is ``>= low`` (``high``: the overshoot warning); ``sft_steps`` stays the
    cap. ``None``: run all ``sft_steps``."""
    sft_check_every: int = 100
    """SFT steps between the band checks."""
    sft_check_problems: int = 100
    """Validation problems of a band check (the run's validation split, never its test split)."""
    sft_lr: float = 3e-3
    """Peak learning rate of the warm-up (full fine-tune)."""
    sft_batch_size: int = 32
    """Examples per warm-up step."""
    population: int = 2
    """Agents in the population (1 = a plain GRPO run, no evolution). On the demo, at equal generated
    tokens, 2 agents x 200 steps beat 4 x 100 (seeds 0-2: +25.3 vs +22.5 points) and match one agent
    x 400 (+24.5): a quarter of the steps per lineage cost more than selection recovered
    (``benchmarks/README.md``, Learning)."""
    train_size: int = 4000
    """Training problems."""
    test_size: int = 200
    """Test problems: the final table (SFT start vs elite), never seen by training or selection.
    200 problems give a standard error of about 3 points at 30 % accuracy."""
    validation_size: int = 200
    """Validation problems: fitness (exact accuracy, ties broken by total reward) for evolution,
    disjoint from the training and test problems (hash split, ``llm_gym.problems``)."""
    eval_batch_size: int = 50
    """Problems per batch when evaluating (fitness, the final table): one batched greedy decode for
    50 problems (x the population) instead of ``prompts_per_step`` at a time, ~5x faster on the tiny model."""
    prompts_per_step: int = 4
    """Prompts per training step (``data_batch_size_per_gpu``); with N processes (``accelerate launch``) the
    step's prompts are shared out over them, so at least N (docs/distributed.md)."""
    group_size: int = 16
    """Completions per prompt."""
    max_output_tokens: int = 40
    """Generation budget per completion."""
    lr: float = 3e-4
    """LoRA learning rate (the initial value; evolution mutates it)."""
    beta: float = 0.0
    """KL coefficient to the SFT model."""
    temperature: float = 0.7
    """Sampling temperature during training."""
    lora_r: int = 16
    """LoRA rank."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose completions all score the same and refill the batch
    with more prompts (:mod:`~llm_gym.algorithms.grpo.dynamic`)."""
    max_refills: int = 3
    """Extra prompt batches per step and agent for dynamic sampling's refills."""
    max_steps: int = 200
    """Training steps (each agent trains on one batch per step). On the demo most of the gain comes in
    the first 25-50 steps; 2 agents x 200 steps cost the wall time of 4 x 100 (the population's batched
    decode) and keep ``make demo`` within 5 minutes."""
    evo_steps: int = 25
    """Steps between evolutions."""
    mutation_sd: float = 0.1
    """Standard deviation of a mutation's multiplicative noise (``lr`` is scaled by ``exp(N(0, sd))``;
    linear genes by ``1 + N(0, sd)``); 80 % of the non-elite agents get one gene mutated per evolution."""
    evaluation_interval: int = 25
    """Steps between held-out evaluations (fitness on the validation split)."""
    output_dir: str | None = None
    """Run folder (default ``runs/<time>``): metrics, elites, checkpoints, plots."""
    resume: str | None = None
    """A run folder (or its ``checkpoints/``) of an earlier run to continue; :func:`load_config`
    restores that run's settings, of which only ``max_steps`` and ``threads`` may change."""
    seed: int = 0
    """Seed of problems, initialisation and evolution."""
    threads: int | None = 1
    """torch intra-op threads (default 1: up to 25x faster for the tiny model on a busy 2-core CPU;
    ``None`` keeps torch's default, better for large models)."""
    sft_cache: bool = True
    """Reuse a cached SFT model of the embedded tiny model trained with exactly this warm-up (key:
    model folder, task, knobs, SFT steps, examples, lr, batch size, seed); reuse is logged."""

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.task_kwargs is None:
            object.__setattr__(self, "task_kwargs", dict(DEMO_TASK_KWARGS.get(self.task, {})))
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"TrainConfig.threads={self.threads} must be >= 1 (or null for torch's default)")
        for name in ("population", "train_size", "test_size", "validation_size", "eval_batch_size", "prompts_per_step", "max_output_tokens", "max_steps",
                     "evo_steps", "evaluation_interval", "lora_r"):  # fmt: skip
            if getattr(self, name) < 1:
                raise UsageError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if not self.mutation_sd >= 0:
            raise UsageError(f"TrainConfig.mutation_sd={self.mutation_sd} must be >= 0")
        if self.group_size < 2:
            raise UsageError(f"TrainConfig.group_size={self.group_size}: GRPO needs at least 2 completions per prompt")
        if self.sft_teacher is None:
            teacher = {"last_step": 0.6} if self.task == "llm_gym/Countdown-v0" else {}
            object.__setattr__(self, "sft_teacher", teacher)
        if self.sft_teacher and self.task != "llm_gym/Countdown-v0":
            raise UsageError(f"TrainConfig.sft_teacher is a Countdown teacher; task {self.task} needs sft_teacher: {{}}")
        if self.sft_stop_band is not None and (len(self.sft_stop_band) != 2
                                               or not 0 <= self.sft_stop_band[0] <= self.sft_stop_band[1] <= 1):
            raise UsageError(f"TrainConfig.sft_stop_band={self.sft_stop_band} must be [low, high] with "
                             "0 <= low <= high <= 1")  # fmt: skip
        if self.sft_check_every < 1 or self.sft_check_problems < 1:
            raise UsageError("TrainConfig.sft_check_every and sft_check_problems must be >= 1")
        if self.sft_steps < 0:
            raise UsageError(f"TrainConfig.sft_steps={self.sft_steps} must be >= 0 (0 skips the warm-up)")
        if self.sft_dataset is not None and not Path(self.sft_dataset).is_dir():
            raise UsageError(f"TrainConfig.sft_dataset={self.sft_dataset!r} is not a folder: pass one written by "
                             "llm-gym eval --save-dataset (or llm-gym data filter)")


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from an optional YAML file, then keyword overrides (``None`` ones are ignored).

    With ``resume`` the run's own ``config.json`` is the base: the file's and the overrides' values
    must equal the run's, except ``max_steps`` and ``threads``
    (:data:`~llm_gym.algorithms.run.resume.RESUMABLE`).

    Raises:
        UsageError: naming an unknown key and the valid ones, a file that cannot be read or parsed,
            a value of the wrong type, or a resume that would change the run's settings.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_yaml(Path(path)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise UsageError(f"unknown train config key {unknown[0]!r}; valid keys: {', '.join(sorted(valid))}")
    if values.get("resume"):
        values = merge_resumed_config(find_resume_point(values["resume"]), values, valid)
    return TrainConfig(**values)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML config file; every way it can be wrong is one :class:`UsageError`."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise UsageError(f"--config {path}: cannot read it ({err.strerror or err}); give a YAML file of TrainConfig "
                         "fields") from None  # fmt: skip
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"--config {path} is not valid YAML{where}: {problem}; write one 'field: value' per line") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"{path}: a train config is a mapping of field: value, got {type(loaded).__name__}")
    return loaded
