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
from pathlib import Path
from typing import Any

from llm_gym.algorithms.run.checks import check_run
from llm_gym.algorithms.run.resume import CONFIG_FILE, ResumePoint
from llm_gym.algorithms.run.warmup import sft_data_line, sft_model
from llm_gym.algorithms.train_config import DEMO_TASK_KWARGS, TrainConfig, load_config

__all__ = ["DEMO_TASK_KWARGS", "TrainConfig", "load_config", "mutation_genes", "run_training"]

logger = logging.getLogger(__name__)

def _finished_summary(run_dir: Path, point: ResumePoint | None, config: TrainConfig) -> dict[str, Any] | None:
    """The summary of a resumed run with nothing left to do (``max_reward`` reached, or its checkpoint at ``max_steps``).

    A finished run's ``summary.json`` is returned as it is (not overwritten); a run killed after its
    last checkpoint but before the summary returns None and is summed up from the checkpoint.
    """
    summary_file = run_dir / "summary.json"
    if point is None or not (point.max_reward_reached or point.step >= config.max_steps) or not summary_file.is_file():
        return None
    logger.info("resume: %s already finished at step %d; its summary stands", run_dir, point.step)
    return json.loads(summary_file.read_text())


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

    Everything the config names is checked first (task, knobs, model, resume point), so a bad
    input raises before any work and leaves no run folder. A resume continues the run in its own
    folder on the model its checkpoint sits on (the SFT warm-up is not repeated); a resumed run
    that has nothing left to do returns its ``summary.json`` unchanged.

    Fitness is exact accuracy on the validation split (ties broken by total reward); the table
    compares the SFT start and the elite on the test split, which neither training nor selection reads.

    Under ``accelerate launch`` / ``torchrun`` with N processes (:mod:`~llm_gym.algorithms.run.distributed`),
    process 0 runs the SFT warm-up and writes every file; each step's ``prompts_per_step`` prompts
    are shared out over the processes, and so is every evaluation.

    Returns:
        ``{"sft": test metrics, "elite": test metrics, "gain", "gain_se", "sft_validation",
        "elite_validation", "elite_hyperparameters", "seconds", "run_dir", "world_size",
        "prompts_per_process"}``; the test metrics have
        ``accuracy``, ``accuracy_se`` and ``problems`` (see :mod:`~llm_gym.algorithms.run.report`).

    Raises:
        UsageError: naming a bad value of the config and the fix.
    """
    import torch
    from peft import LoraConfig

    from llm_gym.algorithms.grpo.population import create_population
    from llm_gym.algorithms.run.distributed import DataParallel, check_processes
    from llm_gym.algorithms.run.loop import close_agents
    from llm_gym.models import lora_target_modules
    from llm_gym.multi_turn import multi_turn_recipe
    from llm_gym.reasoning_gym import ReasoningGym

    start = time.perf_counter()
    point = check_run(config)  # before any work or write: a bad input leaves nothing behind
    check_processes(config.prompts_per_step, config.train_size, multi_turn_recipe(config.task) is not None,
                    config.dynamic_sampling)  # fmt: skip
    dp = DataParallel.from_environment()  # one process, or this one's place among N (accelerate launch)
    run_dir = point.run_dir if point is not None else Path(config.output_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(dp.broadcast(str(run_dir)))  # process 0's clock names the folder
    finished = _finished_summary(run_dir, point, config)
    if finished is not None:
        dp.close()
        return finished
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    multi_turn = multi_turn_recipe(config.task)  # None for single-turn tasks
    if dp.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = dataclasses.asdict(config) | {"resume": None}  # the run's settings; resuming is not one of them
        (run_dir / CONFIG_FILE).write_text(json.dumps(saved, indent=2))
        model_path, tokenizer = sft_model(config, run_dir, point, multi_turn)
    model_path = dp.broadcast(model_path if dp.is_main else None)  # the other processes wait for the warm-up
    if not dp.is_main:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    if multi_turn is None:
        env = ReasoningGym.from_task(config.task, tokenizer, train_size=config.train_size, test_size=config.test_size,
                                     validation_size=config.validation_size, seed=config.seed,
                                     data_batch_size_per_gpu=config.prompts_per_step, eval_batch_size=config.eval_batch_size,
                                     **config.task_kwargs)  # fmt: skip
    else:  # test_size held-out games, each against the optimal and the random opponent
        env = multi_turn.make_env(tokenizer, data_batch_size_per_gpu=config.prompts_per_step,
                                  test_games=config.test_size, train_size=config.train_size, seed=config.seed,
                                  **config.task_kwargs)  # fmt: skip
    context = {} if multi_turn is None else {"max_model_len": multi_turn.max_model_len}
    lora = LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules=lora_target_modules(model_path),
                      task_type="CAUSAL_LM", lora_dropout=0.0)  # fmt: skip
    pop = create_population(
        config.population, model_name=model_path, pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token,
        lora_config=lora, batch_size=config.prompts_per_step * config.group_size, group_size=config.group_size,
        max_output_tokens=config.max_output_tokens, lr=config.lr, beta=config.beta, temperature=config.temperature,
        dynamic_sampling=config.dynamic_sampling, max_refills=config.max_refills, seed=config.seed, **context,
    )  # fmt: skip
    try:
        summary = _evolve_and_report(config, pop, env, multi_turn, point, run_dir, start, dp)
        if dp.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    finally:
        close_agents(pop)  # every later agent is a clone sharing this backend: a vLLM engine is shut down either way
        dp.close()
    return summary


def _evolve_and_report(
    config: TrainConfig, pop: list[Any], env: Any, multi_turn: Any, point: ResumePoint | None, run_dir: Path,
    start: float, dp: Any,
) -> dict[str, Any]:
    """The SFT start's evaluation, population GRPO with evolution, then the summary (``start``: the run's clock;
    ``dp``: this process's :class:`~llm_gym.algorithms.run.distributed.DataParallel`)."""
    from llm_gym.algorithms.evolution.mutation import Mutations
    from llm_gym.algorithms.evolution.selection import TournamentSelection
    from llm_gym.algorithms.run.loop import finetune_llm_reasoning
    from llm_gym.algorithms.run.report import build_summary

    # LoRA's B matrices start at zero: every agent is still exactly the SFT model here.
    # Fitness: exact accuracy on the validation split; a game env has none yet, so its held-out games' reward.
    fitness_split, fitness = ("validation", "accuracy") if multi_turn is None else ("test", "reward")
    evaluate = dp.evaluate  # sharded over the processes and gathered; the plain evaluation in one process
    sft_eval = evaluate(pop[0], env, split="test")
    sft_validation = evaluate(pop[0], env, split=fitness_split) if multi_turn is None else sft_eval
    logger.info("SFT model on %d test problems: %s", config.test_size, sft_eval)

    evolve = config.population > 1
    pop = finetune_llm_reasoning(
        pop, env,
        evo_steps=config.evo_steps if evolve else None,
        tournament=TournamentSelection(2, True, config.population, rand_seed=config.seed) if evolve else None,
        mutation=Mutations(no_mutation=0.2, rl_hp=0.8, mutation_sd=config.mutation_sd, rand_seed=config.seed,
                           hp_config=mutation_genes(config.beta)) if evolve else None,
        evaluation_interval=config.evaluation_interval,
        max_steps=point.step if point and point.max_reward_reached else config.max_steps,
        elite_path=str(run_dir / "elites"), checkpoint_path=str(run_dir / "checkpoints"),
        resume_from=str(point.checkpoint) if point else None,
        log_dir=str(run_dir), max_reward=1.0 if multi_turn is None else env.rubric.max_total, fitness=fitness,
        fitness_split=fitness_split, eval_problems=config.validation_size if multi_turn is None else None,
        initial_eval=sft_validation, data_parallel=dp,
        close_backends=False,  # the elite is evaluated below; run_training closes
    )  # fmt: skip
    best = max(pop, key=lambda a: a.fitness[-1] if a.fitness else float("-inf"))
    if not best.fitness:
        dp.test(best, env, split=fitness_split, fitness=fitness)
    elite_validation = dict(best.last_eval)
    return build_summary(
        config.task, sft_eval, evaluate(best, env, split="test"), sft_validation=sft_validation,
        elite_validation=elite_validation, elite_hyperparameters=dataclasses.asdict(best.hps),
        sft_data=sft_data_line(config), seconds=time.perf_counter() - start, run_dir=str(run_dir),
        world_size=dp.world_size, prompts_per_process=dp.prompts_per_process(),
    )  # fmt: skip
