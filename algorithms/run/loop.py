"""``finetune_llm_reasoning``: train a population of GRPO agents with evolutionary hyper-parameter search.

The loop reads top to bottom, once per training step::

    prompts (one batch, the same for every agent)
      -> every agent's completions in one batched decode (:mod:`~llm_gym.algorithms.rollout.population`)
      -> for each agent: score (:mod:`~llm_gym.algorithms.rollout.rollout`) -> learn -> log
    every evaluation_interval steps: fitness = held-out evaluation (fixed test or validation problems, greedy, batched)
    every evo_steps steps:           tournament selection -> save elite -> mutation
    every checkpoint_interval steps: whole-population checkpoint (atomic)
    -> next batch

Every agent trains on the same prompts in a step, so fitness differences come from the agents,
not from the batches they happened to draw.

Under ``accelerate launch`` / ``torchrun`` with N processes every process holds every agent and takes
its share of each batch; gradients, evaluations and metrics are gathered, and process 0 alone writes
(:mod:`~llm_gym.algorithms.run.distributed`).

Smoke runs: three environment variables cap ANY run, whatever its arguments, so that an unmodified
user script (e.g. the AgileRL tutorial, which asks for a 4000-step epoch) can run end to end in CI.
Each cap that takes effect is logged as a warning; unset (the default) means no cap.

* ``LLM_GYM_MAX_STEPS``: at most this many training steps (in total, counting resumed ones).
* ``LLM_GYM_MAX_OUTPUT_TOKENS``: every agent's ``max_output_tokens`` is lowered to this.
* ``LLM_GYM_EVAL_PROBLEMS``: each evaluation uses at most this many test problems.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from llm_gym.algorithms.evolution.fitness import fitness_of
from llm_gym.algorithms.evolution.lineage import merge_events
from llm_gym.algorithms.grpo import dynamic
from llm_gym.algorithms.grpo.population import population_fitness
from llm_gym.algorithms.rollout.population import population_rollouts
from llm_gym.algorithms.rollout.rollout import Rollout
from llm_gym.algorithms.run.checkpoints import load_population, save_population, write_with_tokenizer
from llm_gym.algorithms.run.distributed import DataParallel
from llm_gym.algorithms.run.elites import EliteStore
from llm_gym.algorithms.run.loggers import (
    CompletionSampleLog,
    MetricLogger,
    MultiLogger,
    cut_logs,
    make_logger,
)
from llm_gym.algorithms.run.plots import plot_learning_curve

__all__ = ["RunState", "SMOKE_CAPS", "close_agents", "finetune_llm_reasoning"]

logger = logging.getLogger(__name__)

SMOKE_CAPS = ("LLM_GYM_MAX_STEPS", "LLM_GYM_MAX_OUTPUT_TOKENS", "LLM_GYM_EVAL_PROBLEMS")
"""Environment variables that cap a run (see the module docstring)."""


def _smoke_cap(name: str) -> int | None:
    """The positive integer in environment variable ``name``, or None when it is unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"environment variable {name}={raw!r} must be a positive integer; unset it for no cap")
    return value


def _apply_smoke_caps(pop: Sequence[Any], max_steps: int, eval_problems: int | None) -> tuple[int, int | None]:
    """Apply the ``LLM_GYM_*`` caps: returns the capped ``(max_steps, eval_problems)``."""
    steps_cap, tokens_cap, eval_cap = (_smoke_cap(name) for name in SMOKE_CAPS)
    if steps_cap is not None and steps_cap < max_steps:
        logger.warning("LLM_GYM_MAX_STEPS=%d caps this run at %d of %d steps", steps_cap, steps_cap, max_steps)
        max_steps = steps_cap
    if eval_cap is not None and (eval_problems is None or eval_cap < eval_problems):
        logger.warning("LLM_GYM_EVAL_PROBLEMS=%d caps every evaluation at %d test problems", eval_cap, eval_cap)
        eval_problems = eval_cap
    if tokens_cap is not None:
        for agent in pop:
            if agent.hps.max_output_tokens > tokens_cap:
                agent.set_hp("max_output_tokens", tokens_cap)
        logger.warning("LLM_GYM_MAX_OUTPUT_TOKENS=%d caps every agent's completions", tokens_cap)
    return max_steps, eval_problems


@dataclass
class RunState:
    """What the loop keeps besides the agents: fitness records and lineage events, for plots and resume."""

    records: list[dict[str, Any]] = field(default_factory=list)
    """``{"step", "agent", "fitness", "accuracy"}`` per evaluation of an agent."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """Lineage events seen so far (of agents selection dropped too)."""

    def add_events(self, population: Sequence[Any]) -> None:
        """Remember the lineage events of the current population (each once)."""
        self.events = merge_events(self.events, population)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state."""
        return {"records": self.records, "events": self.events}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RunState:
        """Inverse of :meth:`to_dict`."""
        return cls(records=list(state.get("records", [])), events=list(state.get("events", [])))


@dataclass
class _Run:
    """One call of :func:`finetune_llm_reasoning`: its settings and sinks, so each phase is a short method."""

    pop: list[Any]
    env: Any
    state: RunState
    run_dir: Path
    max_steps: int
    evaluation_interval: int
    eval_problems: int | None
    max_reward: float | None
    verbose: bool
    sink: MetricLogger
    samples: CompletionSampleLog
    sample_interval: int
    elites: EliteStore | None
    tournament: Any = None
    mutation: Any = None
    evo_steps: int | None = None
    checkpoint_path: str | None = None
    checkpoint_interval: int | None = None
    max_reward_reached: bool = False
    fitness: str = "reward"
    fitness_split: str = "test"
    close_backends: bool = True
    dp: DataParallel = field(default_factory=DataParallel)

    @property
    def evolve(self) -> bool:
        return self.tournament is not None and self.evo_steps is not None

    def train(self, prompts: Any, step: int) -> dict[str, float]:
        """Every agent: rollout on ``prompts`` -> learn; returns the step's metrics (``agent<slot>/...``)."""
        step_metrics: dict[str, float] = {}
        # Every agent's completions in one batched decode when they share the model (None: one by one).
        firsts = population_rollouts(self.pop, self.env, prompts)
        for slot, agent in enumerate(self.pop):
            first = None if firsts is None else firsts[slot]
            sampled = dynamic.sample(agent, self.env, prompts, first)  # a rollout; refilled with dynamic sampling
            batch = sampled.first
            metrics = agent.learn(sampled.batch.experience) | sampled.metrics
            metrics.update({f"train/{k}": v for k, v in batch.metrics.items()})
            step_metrics.update({f"agent{slot}/{k}": float(v) for k, v in metrics.items()})
            if self.sample_interval and step % self.sample_interval == 0 and self.dp.is_main:
                _log_samples(self.samples, self.env, agent, step, prompts, batch)
        if self.dp.enabled:
            logger.debug("process %d of %d: step %d on %d prompts", self.dp.rank, self.dp.world_size, step + 1,
                         len(prompts))  # fmt: skip
        step_metrics = self.dp.reduce_metrics(step_metrics, len(prompts) * len(self.pop))
        means = [step_metrics.get(f"agent{s}/train/reward/total", math.nan) for s in range(len(self.pop))]
        step_metrics["train/reward_mean"] = sum(means) / len(means)
        step_metrics["data/epoch"] = float(getattr(self.env, "num_epochs", 0))
        return step_metrics

    def due(self, step: int) -> bool:
        """Whether ``step`` ends with an evaluation (every interval, the last step, every evolution)."""
        return step % self.evaluation_interval == 0 or step == self.max_steps or (self.evolve and step % self.evo_steps == 0)

    def evaluate(self, step: int, step_metrics: dict[str, float]) -> None:
        """Fitness of every agent, then evolution or the final elite, then the ``max_reward`` stop."""
        if self.dp.enabled:  # each agent's evaluation sharded over the processes and gathered
            scores = [self.dp.test(agent, self.env, max_problems=self.eval_problems, split=self.fitness_split,
                                   fitness=self.fitness) for agent in self.pop]  # fmt: skip
        else:  # each agent's test, decoded together
            scores = population_fitness(self.pop, self.env, self.eval_problems, split=self.fitness_split,
                                        fitness=self.fitness)  # fmt: skip
        for agent, fitness in zip(self.pop, scores, strict=True):
            accuracy = agent.last_eval.get("accuracy", math.nan)
            self.state.records.append({"step": step, "agent": int(agent.index), "fitness": float(fitness),
                                       "accuracy": float(accuracy)})  # fmt: skip
        fits = [a.fitness[-1] for a in self.pop]
        step_metrics.update({"evo/fitness_max": max(fits), "evo/fitness_mean": sum(fits) / len(fits)})
        for slot, agent in enumerate(self.pop):
            step_metrics.update({f"agent{slot}/eval/{k}": v for k, v in agent.last_eval.items()})
            step_metrics.update({f"agent{slot}/hp/{k}": float(v) for k, v in _numeric_hps(agent).items()})
        if self.verbose:
            logger.info("step %d: fitness %s", step, ", ".join(f"{f:.3f}" for f in fits))
        if self.evolve and step % self.evo_steps == 0:
            elite, self.pop = self.tournament.select(self.pop)
            _save_elite(self.elites, elite, step, self.env)
            if elite not in self.pop and hasattr(elite, "release"):
                elite.release()
            self.pop = self.mutation.mutation(self.pop)
            self.dp.check_in_step(self.pop)  # the same decisions on every process (same fitness, same seeds)
            self.state.add_events(self.pop)
        elif self.elites is not None and step == self.max_steps:
            _save_elite(self.elites, max(self.pop, key=lambda a: a.fitness[-1]), step, self.env)
        if self.max_reward is not None and max(fits) >= self.max_reward:
            logger.info("best fitness %.3f reached max_reward %.3f: stopping", max(fits), self.max_reward)
            self.max_steps = step
            self.max_reward_reached = True

    def checkpoint(self, step: int) -> None:
        """Write the whole population and the run state when a checkpoint is due."""
        if not self.checkpoint_path or (step % self.checkpoint_interval and step != self.max_steps):
            return
        rank_rng = self.dp.rng_states()  # collective: every process's sampling RNG, so a resume continues each
        if not self.dp.is_main:
            return
        extra: dict[str, Any] = {"run": self.state.to_dict(), "run_dir": str(self.run_dir),
                                 "max_reward_reached": self.max_reward_reached}  # fmt: skip
        if rank_rng is not None:
            extra.update(world_size=self.dp.world_size, rank_rng=rank_rng)
        if self.evolve:
            extra.update(tournament=self.tournament.state_dict(), mutation=self.mutation.state_dict())
        save_population(Path(self.checkpoint_path) / "latest", self.pop, step=step, env=self.env, extra=extra)

    def loop(self, prompts: Any, start: int) -> None:
        """Train from step ``start`` to ``max_steps`` (which ``max_reward`` may lower), one batch a step."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        bar = tqdm(total=self.max_steps, initial=start, disable=not self.verbose, desc="training", unit="step")
        step = start
        redirect = logging_redirect_tqdm()  # log lines go through the bar while it runs (else onto it)
        redirect.__enter__()
        try:
            while step < self.max_steps:
                step_metrics = self.train(prompts, step)
                step += 1
                summary = _step_summary(step_metrics, len(self.pop))
                # The progress bar shows these; the log line is for runs without a terminal (DEBUG).
                logger.debug("step %d | %s", step, " ".join(f"{k} {v:.3g}" for k, v in summary.items()))
                if self.due(step):
                    self.evaluate(step, step_metrics)
                self.sink.log(step_metrics, step)
                bar.update(1)
                bar.set_postfix(summary | {"best": max((r["fitness"] for r in self.state.records), default=math.nan)})
                self.checkpoint(step)
                if step < self.max_steps:
                    prompts = self.env.reset()
        finally:
            bar.close()
            self.sink.close()
            redirect.__exit__(None, None, None)
            if self.close_backends:  # after the last checkpoint and elite: nothing is lost
                close_agents(self.pop)


def close_agents(pop: Sequence[Any]) -> None:
    """Shut down every agent's generation backend (``agent.close()``; agents without one are skipped)."""
    for agent in pop:
        close = getattr(agent, "close", None)
        if close is not None:
            close()


def _log_samples(samples: CompletionSampleLog, env: Any, agent: Any, step: int, prompts: Any, batch: Rollout) -> None:
    """Write the first prompt's first two completions (text, reward, parts) to the JSONL log."""
    tokenizer = env.tokenizer
    prompt_len = int(prompts[0]["input_ids"].shape[1])
    ids = batch.completion_ids[0]  # [G, L + C]
    scores = batch.scores[0] if batch.scores else []
    prompt_text = tokenizer.decode(ids[0, :prompt_len])
    for g in range(min(2, ids.shape[0])):
        parts = scores[g].parts if g < len(scores) else {}
        if batch.texts:
            completion = batch.texts[0][g]
        else:
            completion = tokenizer.decode(ids[g, prompt_len:], skip_special_tokens=True)
        samples.write(step, int(agent.index), prompt_text, completion, float(batch.rewards[0, g]), parts)


def _check_arguments(
    pop: list[Any], evaluation_interval: int, tournament: Any, mutation: Any, evo_steps: int | None
) -> bool:
    """Validate the loop's arguments; returns whether the run evolves."""
    if not pop:
        raise ValueError("pop is empty: give at least one agent")
    if evaluation_interval < 1:
        raise ValueError(f"evaluation_interval must be >= 1, got {evaluation_interval}")
    if (tournament is None) != (mutation is None):
        raise ValueError("give both tournament and mutation for evolution, or neither")
    evolve = tournament is not None and evo_steps is not None
    if evolve and evo_steps < 1:
        raise ValueError(f"evo_steps must be >= 1 or None, got {evo_steps}")
    return evolve


def _resume(
    resume_from: str | None, pop: list[Any], env: Any, evolve: bool, tournament: Any, mutation: Any, max_steps: int,
    dp: DataParallel,
) -> tuple[int, RunState, str | None]:
    """Restore a checkpoint (``(step, run state, run folder)``), or start fresh at step 0."""
    if not resume_from:
        run = RunState()
        run.add_events(pop)
        dp.sync_start(pop)
        return 0, run, None
    resume = Path(resume_from)
    if resume.name != "latest" and not (resume / "state.json").is_file():
        resume = resume / "latest"  # the checkpoint_path of a run (load_population repairs a killed write)
    with dp.main_first():  # process 0 repairs a write killed between its renames before the others read
        state = load_population(resume, pop, env=env)
    dp.sync_start(pop, state.get("rank_rng"))
    if evolve and state.get("tournament"):
        tournament.load_state_dict(state["tournament"])
        mutation.load_state_dict(state["mutation"])
    logger.info("resuming at step %d of %d", int(state["step"]), max_steps)
    return int(state["step"]), RunState.from_dict(state.get("run", {})), state.get("run_dir")


def _wandb_login(wb: bool, wandb_api_key: str | None) -> None:
    if wb and wandb_api_key:
        try:
            import wandb

            wandb.login(key=wandb_api_key)
        except Exception as err:  # logged by make_logger as well; the run goes on
            logger.warning("W&B login failed (%s); continuing without it", err)


def finetune_llm_reasoning(
    pop: Sequence[Any],
    env: Any,
    init_hp: dict[str, Any] | None = None,
    save_elite: bool | None = None,
    elite_path: str | None = None,
    wb: bool = False,
    evo_steps: int | None = 20,
    tournament: Any = None,
    mutation: Any = None,
    wandb_api_key: str | None = None,
    evaluation_interval: int = 10,
    max_reward: float | None = None,
    verbose: bool = True,
    accelerator: Any = None,
    max_steps: int | None = None,
    num_epochs: int | None = None,
    checkpoint_interval: int | None = None,
    checkpoint_path: str | None = None,
    resume_from: str | None = None,
    log_dir: str | None = None,
    eval_problems: int | None = 100,
    keep_elites: int = 3,
    sample_interval: int = 10,
    loggers: MetricLogger | None = None,
    fitness: str = "reward",
    fitness_split: str = "test",
    initial_eval: dict[str, float] | None = None,
    close_backends: bool = True,
    data_parallel: DataParallel | None = None,
) -> list[Any]:
    """Train a population of GRPO agents on a :class:`~llm_gym.reasoning_gym.ReasoningGym`.

    Arguments follow AgileRL's ``finetune_llm_reasoning`` (seed 001), plus resume and logging.

    Args:
        pop: The agents (see :func:`~llm_gym.algorithms.population.create_population`); one agent is a
            plain GRPO run.
        env: The batched environment.
        init_hp: Accepted for AgileRL compatibility; hyper-parameters live on the agents.
        save_elite: Save the best agent at every evolution (and at the end). Default: when
            ``elite_path`` is given.
        elite_path: Folder of elite checkpoints (default ``checkpoints``); the best ``keep_elites`` are
            kept, each a plain PEFT adapter plus ``llm_gym_agent.json`` and ``elite.json``.
        wb: Also log to Weights & Biases (a warning, and the run goes on, when wandb is missing or not
            configured).
        evo_steps: Training steps between evolutions (tournament + mutation); ``None`` never evolves.
        tournament: A :class:`~llm_gym.algorithms.evolution.TournamentSelection`, or None.
        mutation: A :class:`~llm_gym.algorithms.evolution.Mutations`, or None.
        wandb_api_key: Logs in to W&B with this key when given.
        evaluation_interval: Training steps between held-out evaluations (fitness).
        max_reward: Stop once the best fitness reaches this.
        verbose: Show a progress bar and log evaluations (process 0 only).
        accelerator: Accepted for AgileRL compatibility. Several processes are found from the
            launcher's environment (``accelerate launch`` / ``torchrun``), with or without it: every
            process holds every agent and takes its share of each batch; process 0 writes logs,
            checkpoints and elites (:mod:`~llm_gym.algorithms.run.distributed`).
        max_steps: Training steps (one batch each); default: ``num_epochs`` epochs, or one epoch.
        num_epochs: Stop after this many passes over the training data.
        checkpoint_interval: Steps between population checkpoints; default ``evo_steps`` when
            ``checkpoint_path`` is given, so at most one evolution step is lost.
        checkpoint_path: Folder of the population checkpoint (``<path>/latest``): adapters,
            optimizer states, hyper-parameters, fitness, lineage, RNG states, data position,
            selection/mutation state, written atomically.
        resume_from: A checkpoint folder (or its parent) of an earlier run to continue from. Build
            ``pop`` and ``env`` as that run did (same size, base model, LoRA config and data); with
            the same ``max_steps`` the resumed run reproduces the uninterrupted one.
        log_dir: Run folder for ``metrics.csv``, TensorBoard, ``completions.jsonl`` and
            ``learning_curve.png``; default ``runs/<time>``, or the resumed run's folder.
        eval_problems: Evaluate on the first this-many test problems (the same ones for every
            agent and every evaluation; rounded up to whole batches); ``None``: the whole test split.
        keep_elites: How many elite checkpoints to keep.
        sample_interval: Steps between completion samples written to ``completions.jsonl``.
        loggers: Metric sinks to use instead of the default CSV + TensorBoard (+ W&B).
        fitness: ``"reward"`` (mean greedy total reward, AgileRL's) or ``"accuracy"`` (exact
            accuracy, ties broken by total reward: ranks agents where the format reward saturates;
            :mod:`~llm_gym.algorithms.evolution.fitness`).
        fitness_split: The split fitness is measured on: ``"test"``, or ``"validation"`` so that
            selection never sees the problems a final report is measured on (a ReasoningGym built
            with ``validation_size``).
        initial_eval: The starting model's evaluation on the fitness split (every agent starts as
            it, e.g. the SFT model under fresh LoRA adapters): recorded at step 0 for every agent,
            so the learning curve starts there (not on resume).
        close_backends: At the end (also on an error) close every agent's generation backend
            (:meth:`GRPO.close`: a vLLM engine and its GPU memory). False keeps the agents
            generating, e.g. for a final evaluation; then close them yourself.
        data_parallel: This process's place among several
            (:class:`~llm_gym.algorithms.run.distributed.DataParallel`; it counts the prompts each
            process rolled out); default: found from the launcher's environment.

    Returns:
        The final population.

    Raises:
        ValueError: on an empty population, non-positive intervals, or only one of
            ``tournament``/``mutation``; on a malformed ``LLM_GYM_*`` cap (see the module docstring).
    """
    pop = list(pop)
    evolve = _check_arguments(pop, evaluation_interval, tournament, mutation, evo_steps)
    dp = data_parallel if data_parallel is not None else DataParallel.from_environment()
    dp.prepare_env(env, pop)
    if max_steps is None:
        batches = env.num_batches("train") if hasattr(env, "num_batches") else len(env)
        max_steps = batches * (num_epochs or 1)
    max_steps, eval_problems = _apply_smoke_caps(pop, max_steps, eval_problems)
    save_elite = elite_path is not None if save_elite is None else save_elite
    if checkpoint_path and checkpoint_interval is None:
        checkpoint_interval = evo_steps if evolve else evaluation_interval
    if checkpoint_interval is not None and checkpoint_interval < 1:
        raise ValueError(f"checkpoint_interval must be >= 1 or None, got {checkpoint_interval}")

    start, state, saved_run_dir = _resume(resume_from, pop, env, evolve, tournament, mutation, max_steps, dp)
    if initial_eval is not None and start == 0:
        score = fitness_of(initial_eval, fitness, getattr(getattr(env, "rubric", None), "max_total", None))
        state.records.extend({"step": 0, "agent": int(a.index), "fitness": score,
                              "accuracy": float(initial_eval.get("accuracy", math.nan))} for a in pop)  # fmt: skip
    run_dir = Path(dp.broadcast(str(log_dir or saved_run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))))
    if resume_from and dp.is_main:
        cut_logs(run_dir, start)  # steps after the checkpoint are trained and logged again
    if dp.is_main:
        _wandb_login(wb, wandb_api_key)
    if not dp.is_main:  # process 0 alone writes
        loggers, save_elite = MultiLogger(()), False
    run = _Run(
        pop=pop, env=env, state=state, run_dir=run_dir, max_steps=max_steps, evaluation_interval=evaluation_interval,
        eval_problems=eval_problems, max_reward=max_reward,
        sink=loggers if loggers is not None else make_logger(run_dir, wb=wb, config={"population": len(pop)},
                                                             purge_step=start + 1 if resume_from else None),
        samples=CompletionSampleLog(run_dir / "completions.jsonl"), sample_interval=sample_interval,
        elites=EliteStore(elite_path or "checkpoints", keep=keep_elites) if save_elite else None,
        tournament=tournament if evolve else None, mutation=mutation if evolve else None,
        evo_steps=evo_steps if evolve else None, checkpoint_path=checkpoint_path, checkpoint_interval=checkpoint_interval,
        fitness=fitness, fitness_split=fitness_split, close_backends=close_backends, dp=dp,
        verbose=verbose and dp.is_main,
    )  # fmt: skip
    run.loop(env.reset(reset_dataloaders=not resume_from and start == 0), start)
    if dp.enabled:
        logger.info("process %d of %d: rolled out %d training prompts", dp.rank, dp.world_size, dp.prompts)
    if state.records and dp.is_main:
        by_accuracy = fitness == "accuracy"
        plot_learning_curve(
            state.records, run_dir / "learning_curve.png", events=state.events,
            max_fitness=None if by_accuracy else max_reward, value="accuracy" if by_accuracy else "fitness",
            title=f"Population: exact accuracy on the {fitness_split} split" if by_accuracy else "Population fitness",
            ylabel=f"exact accuracy ({fitness_split})" if by_accuracy else "fitness",
        )  # fmt: skip
    return run.pop


_SUMMARY_KEYS = {
    "reward": "train/reward/total",
    "len": "completion/length_mean",
    "kl": "loss/kl",
    "clip": "grpo/clip_fraction",
}


def _step_summary(step_metrics: dict[str, float], population: int) -> dict[str, float]:
    """Population means of the headline metrics of a step: reward total and parts, length, KL, clip fraction."""

    def mean(key: str) -> float:
        values = [step_metrics[f"agent{s}/{key}"] for s in range(population) if f"agent{s}/{key}" in step_metrics]
        return sum(values) / len(values) if values else math.nan

    parts = sorted({k.split("/", 1)[1].removeprefix("train/reward/") for k in step_metrics
                    if "/train/reward/" in k and not k.endswith(("/total", "/failures"))})  # fmt: skip
    summary = {"reward": mean(_SUMMARY_KEYS["reward"])}
    summary.update({part: mean(f"train/reward/{part}") for part in parts})
    summary.update({name: mean(key) for name, key in _SUMMARY_KEYS.items() if name != "reward"})
    return {k: v for k, v in summary.items() if not math.isnan(v)}


def _numeric_hps(agent: Any) -> dict[str, float]:
    """The agent's numeric hyper-parameters (its config's int and float fields), for logs and elites."""
    hps = getattr(agent, "hps", None)
    if hps is None or not dataclasses.is_dataclass(hps):
        return {}
    return {k: v for k, v in dataclasses.asdict(hps).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _save_elite(elites: EliteStore | None, agent: Any, step: int, env: Any) -> None:
    if elites is None or not agent.fitness or not math.isfinite(agent.fitness[-1]):
        return
    task = getattr(env, "task", None)
    metadata = {
        "task": getattr(task, "env_id", None),
        "base_model": getattr(agent, "model_id", None),
        "hyperparameters": _numeric_hps(agent),
        "eval": dict(getattr(agent, "last_eval", {})),
        "lineage": list(getattr(agent, "lineage", [])),
    }
    path = elites.save(step, int(agent.index), float(agent.fitness[-1]), partial(write_with_tokenizer, agent, env),
                       metadata)  # fmt: skip
    if path is not None:
        logger.info("saved elite agent %d (fitness %.3f) to %s", agent.index, agent.fitness[-1], path)
