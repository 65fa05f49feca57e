"""The SFT warm-up of the main job: the starting model, its warm-up data (oracle, weak teacher, saved
rollouts or a game's filtered games), the band stop, and a cache of warmed-up tiny models.

:func:`sft_model` is what :func:`~llm_gym.algorithms.recipe.run_training` calls before building the
population; GRPO from a random-init model does not learn, so the embedded tiny model is warmed up first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_gym.algorithms.run.resume import ResumePoint

if TYPE_CHECKING:  # annotations only
    from llm_gym.algorithms.train_config import TrainConfig

__all__ = ["SFT_WARMUP_STEPS", "sft_data_line", "sft_model"]

logger = logging.getLogger(__name__)

SFT_WARMUP_STEPS = 20
"""Learning-rate warm-up steps of the SFT warm-up (part of the cache key)."""


def sft_model(
    config: TrainConfig, run_dir: Path, point: ResumePoint | None = None, multi_turn: Any = None
) -> tuple[str, Any]:
    """The warm-started model folder and its tokenizer.

    Args:
        config: The run's settings (model, task, knobs, ``sft_*`` fields, seed).
        run_dir: The run folder; the SFT model is saved in ``<run_dir>/sft_model``.
        point: The resume point: a resume reuses the model its checkpoint sits on (no warm-up).
        multi_turn: The env's :class:`~llm_gym.multi_turn.MultiTurnRecipe` (a game: its SFT data), or None.

    Returns:
        ``(model folder, tokenizer)``; with ``sft_steps == 0`` the starting model itself.
    """
    from tqdm.contrib.logging import logging_redirect_tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_gym.algorithms.sft import SFTConfig, dataset_examples, length_report, oracle_examples, train_sft
    from llm_gym.models import resolve_model
    from llm_gym.registry import get_task
    from llm_gym.tiny import tiny_model_path

    if point is not None and config.sft_steps > 0:
        logger.info("resume: the SFT model is the run's own %s (the warm-up is not repeated)", point.base_model)
        return str(point.base_model), AutoTokenizer.from_pretrained(point.base_model)
    env_ids = multi_turn.tokenizer_env_ids if multi_turn is not None else None
    source = (resolve_model(config.model) if config.model
              else str(tiny_model_path(config.tiny_preset, seed=config.seed, env_ids=env_ids)))
    tokenizer = AutoTokenizer.from_pretrained(source)
    if config.sft_steps == 0:
        return source, tokenizer
    cache = _sft_cache_dir(config, source) if config.sft_cache and config.model is None else None
    if cache is not None and (cache / "config.json").is_file():
        logger.info("SFT warm-up reused from cache %s (identical model, task, knobs and SFT settings; "
                    "set sft_cache=False to train it again)", cache)  # fmt: skip
        return str(cache), tokenizer
    model = AutoModelForCausalLM.from_pretrained(source)
    seq_len = 512 if multi_turn is None else multi_turn.sft_seq_len
    if multi_turn is not None:  # a game: the teacher's filtered games (sft_examples games played)
        examples = multi_turn.sft_examples(config.sft_examples, seed=config.seed + 1, **config.task_kwargs)
    elif config.sft_dataset is not None:
        from llm_gym.rollout_dataset import load_rollouts

        examples = dataset_examples(load_rollouts(config.sft_dataset), tokenizer)
    else:
        solver = None
        if config.sft_teacher:
            from llm_gym.tasks.countdown_teacher import WeakTeacher

            solver = WeakTeacher(config.sft_teacher, seed=config.seed + 2)
            logger.info("SFT data from a %s (not the exact oracle)", solver.describe())
        examples = oracle_examples(get_task(config.task), tokenizer, size=config.sft_examples, seed=config.seed + 1, solver=solver,
                                   **config.task_kwargs)  # fmt: skip
        if solver is not None:
            logger.info("teacher habits written: %s of %d examples", solver.applied, solver.calls)
    report = length_report(examples, tokenizer, seq_len=seq_len)
    logger.info("SFT data: %d examples, longest %d tokens, %.2f %% fit in %d", len(examples), report.max_length,
                100 * report.fit_fraction, seq_len)  # fmt: skip
    sft = SFTConfig(max_steps=config.sft_steps, lr=config.sft_lr, batch_size=config.sft_batch_size,
                    warmup_steps=SFT_WARMUP_STEPS, seed=config.seed, progress=True, seq_len=seq_len)  # fmt: skip
    with logging_redirect_tqdm():  # log lines go through the progress bar, not onto it
        result = train_sft(model, tokenizer, examples, sft, callback=_band_stop(config, model, tokenizer))
    logger.info("SFT: %d steps in %.1fs, final loss %.3f%s", result.steps, result.seconds, result.losses[-1],
                " (stopped in the band)" if result.stopped_early else "")  # fmt: skip
    out = (run_dir / "sft_model").resolve()  # absolute: adapters record it as their base model
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


def sft_data_line(config: TrainConfig) -> str:
    """What wrote the warm-up data, in one line (the main job prints it under its table).

    Args:
        config: The run's settings.

    Returns:
        The line.
    """
    if config.sft_steps == 0:
        return "no SFT warm-up"
    if config.sft_dataset is not None:
        return f"SFT warm-up on the saved rollouts in {config.sft_dataset}"
    if not config.sft_teacher:
        return f"SFT warm-up on {config.sft_examples} exact oracle solutions"
    from llm_gym.tasks.countdown_teacher import WeakTeacher

    return (f"SFT warm-up on {config.sft_examples} solutions of a {WeakTeacher(config.sft_teacher).describe()} "
            "(see llm_gym.tasks.countdown_teacher); GRPO learns from the verifier only")


def _band_stop(config: TrainConfig, model: Any, tokenizer: Any) -> Any:
    """The :class:`BandStop` of ``config.sft_stop_band`` (greedy exact accuracy on validation problems), or None."""
    if config.sft_stop_band is None:
        return None
    from llm_gym.algorithms.rollout.policies import ModelPolicy
    from llm_gym.algorithms.rollout.rollout import evaluate
    from llm_gym.algorithms.sft import BandStop
    from llm_gym.reasoning_gym import ReasoningGym

    check = ReasoningGym.from_task(config.task, tokenizer, train_size=1, test_size=1,
                                   validation_size=config.sft_check_problems, seed=config.seed,
                                   data_batch_size_per_gpu=min(50, config.sft_check_problems),
                                   **config.task_kwargs)  # fmt: skip

    def score() -> float:
        policy = ModelPolicy(model, tokenizer.pad_token_id, config.max_output_tokens)
        try:
            return float(evaluate(policy, check, split="validation")["accuracy"])
        finally:
            model.train()

    low, high = config.sft_stop_band
    return BandStop(score, low, high, config.sft_check_every)


def _sft_cache_dir(config: TrainConfig, source: str) -> Path:
    """Cache folder of the SFT model, keyed on every input that changes it.

    The embedded model's folder name carries a hash of its preset, so ``source`` identifies the
    starting weights.
    """
    key = json.dumps([source, config.task, sorted(config.task_kwargs.items()), config.sft_steps, config.sft_examples,
                      config.sft_lr, config.sft_batch_size, config.seed, SFT_WARMUP_STEPS, "v1",
                      sorted(config.sft_teacher.items()), config.sft_stop_band, config.sft_check_every,
                      config.sft_check_problems]
                     + ([_dataset_fingerprint(config.sft_dataset)] if config.sft_dataset else []))  # fmt: skip
    root = Path(os.environ["LLM_GYM_CACHE"]) if os.environ.get("LLM_GYM_CACHE") else Path.home() / ".cache" / "llm_gym"
    return root / f"sft-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _dataset_fingerprint(folder: str) -> str:
    """The saved dataset's content hash (its ``state.json`` fingerprint), so a changed dataset is not a cache hit."""
    state = Path(folder) / "state.json"
    return state.read_text() if state.is_file() else str(Path(folder).resolve())
