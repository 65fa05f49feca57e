"""Checks of a train config before any work or write: the task, its knobs, the model and the resume point.

:func:`check_run` is the first thing :func:`~llm_gym.algorithms.recipe.run_training` does, so a bad
input raises a :class:`~llm_gym.usage.UsageError` naming the value and the fix and leaves no run
folder behind.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from llm_gym.algorithms.run.resume import ResumePoint, find_resume_point, merge_resumed_config
from llm_gym.usage import UsageError, check_model_source

if TYPE_CHECKING:  # annotations only
    from llm_gym.algorithms.train_config import TrainConfig

__all__ = ["check_resume", "check_run"]


def check_run(config: TrainConfig) -> ResumePoint | None:
    """Validate what the config names (task, knobs, model, resume point) before any work or write.

    Returns:
        The resume point when ``config.resume`` is set.

    Raises:
        UsageError: naming the bad value and the fix.
    """
    import gymnasium as gym

    from llm_gym.multi_turn import multi_turn_recipe
    from llm_gym.registry import get_task

    try:
        game = multi_turn_recipe(config.task) is not None
    except gym.error.Error:  # not registered: get_task below names the fix
        game = False
    if game:  # a game: its env checks its own knobs when it is built
        return check_resume(config)
    try:
        task = get_task(config.task)
    except gym.error.Error as err:
        raise UsageError(f"task {config.task!r}: {err}") from None
    try:
        task.make_config(**config.task_kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(f"task_kwargs: {err}") from None
    if task.solve is None and config.sft_steps > 0 and config.sft_dataset is None:
        raise UsageError(f"{config.task} has no oracle solver to write the SFT warm-up's examples: set sft_steps: 0")
    if config.model is not None:
        from transformers import AutoConfig

        from llm_gym.models import ModelResolutionError, resolve_model

        try:
            model = resolve_model(config.model)  # an alias or a .gguf file: converted once to a local folder
        except ModelResolutionError as err:
            raise UsageError(str(err)) from None
        check_model_source(model, "model")
        try:
            AutoConfig.from_pretrained(model)  # a hub id that cannot be found fails here, not after the run starts
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"model {config.model}: cannot load it ({first}); give a local model folder or a hub id") from None
    return check_resume(config)


def check_resume(config: TrainConfig) -> ResumePoint | None:
    """The resume point of ``config.resume`` (None without one), checked against the config.

    Raises:
        UsageError: When the checkpoint's run differs from the config (settings, population size),
            lies beyond ``max_steps``, or its SFT model is gone.
    """
    if not config.resume:
        return None
    point = find_resume_point(config.resume)
    mine = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("resume", "output_dir", "max_steps",
                                                                              "threads")}  # fmt: skip
    try:
        merge_resumed_config(point, mine, mine)
    except UsageError as err:  # a TrainConfig built by hand: its defaults count as given
        raise UsageError(f"{err} (load_config(resume=...) restores the run's own settings)") from None
    if point.agents != config.population:
        raise UsageError(f"the checkpoint {point.checkpoint} holds {point.agents} agents but population="
                         f"{config.population}: resume with load_config(resume=...) to restore the run's settings")  # fmt: skip
    if point.step > config.max_steps:
        raise UsageError(f"max_steps={config.max_steps} is below the checkpoint's step {point.step}: "
                         f"give max_steps >= {point.step}")  # fmt: skip
    if config.sft_steps > 0 and (not point.base_model or not Path(point.base_model).is_dir()):
        raise UsageError(f"the run's SFT model {point.base_model} is gone, and a resume never repeats the warm-up: "
                         "restore that folder or start a new run")  # fmt: skip
    return point
