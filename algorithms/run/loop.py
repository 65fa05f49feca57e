"""``finetune_llm_reasoning``: train a population of GRPO agents with evolutionary hyper-parameter search.

The loop reads top to bottom, once per training step::

    prompts (one batch, the same for every agent)
      -> for each agent: generate -> score -> learn -> log
    every evaluation_interval steps: fitness = held-out evaluation (fixed test problems, greedy)
    every evo_steps steps:           tournament selection -> save elite -> mutation
    every checkpoint_interval steps: whole-population checkpoint (atomic)
    -> next batch

Every agent trains on the same prompts in a step, so fitness differences come from the agents,
not from the batches they happened to draw.

Smoke runs: three environment variables cap ANY run, whatever its arguments, so that an unmodified
user script (e.g. the AgileRL tutorial, which asks for a 4000-step epoch) can run end to end in CI.
Each cap that takes effect is logged as a warning; unset (the default) means no cap.

* ``LLM_GYM_MAX_STEPS``: at most this many training steps (in total, counting resumed ones).
* ``LLM_GYM_MAX_OUTPUT_TOKENS``: every agent's ``max_output_tokens`` is lowered to this.
* ``LLM_GYM_EVAL_PROBLEMS``: each evaluation uses at most this many test problems.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_gym.algorithms.evolution.lineage import lineage_events
from llm_gym.algorithms.run.checkpoints import load_population, save_population
from llm_gym.algorithms.run.elites import EliteStore
from llm_gym.algorithms.run.loggers import CompletionSampleLog, MetricLogger, make_logger
from llm_gym.algorithms.run.plots import plot_learning_curve

__all__ = ["finetune_llm_reasoning", "RunState", "SMOKE_CAPS"]

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
                agent.set_hyperparameter("max_output_tokens", tokens_cap)
        logger.warning("LLM_GYM_MAX_OUTPUT_TOKENS=%d caps every agent's completions", tokens_cap)
    return max_steps, eval_problems


class RunState:
    """What the loop keeps besides the agents: fitness records and lineage events, for plots and resume."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []  # {"step", "agent", "fitness", "accuracy"}
        self.events: list[dict[str, Any]] = []  # lineage events seen so far (clones of dropped agents too)

    def add_events(self, population: Sequence[Any]) -> None:
        """Remember the lineage events of the current population (deduplicated)."""
        seen = {_event_key(e) for e in self.events}
        for event in lineage_events(population):
            if _event_key(event) not in seen:
                self.events.append(event)
                seen.add(_event_key(event))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state."""
        return {"records": self.records, "events": self.events}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RunState:
        """Inverse of :meth:`to_dict`."""
        run = cls()
        run.records = list(state.get("records", []))
        run.events = list(state.get("events", []))
        return run


def _event_key(event: dict[str, Any]) -> str:
    return repr(sorted(event.items()))


def _evaluate(population: Sequence[Any], env: Any, step: int, run: RunState, eval_problems: int | None) -> None:
    for agent in population:
        fitness = agent.test(env, max_problems=eval_problems)
        accuracy = agent.last_eval.get("accuracy", math.nan)
        run.records.append({"step": step, "agent": int(agent.index), "fitness": float(fitness),
                            "accuracy": float(accuracy)})  # fmt: skip


def _log_samples(
    samples: CompletionSampleLog, env: Any, agent: Any, step: int, prompts: Any, completion_ids: Any, rewards: Any
) -> None:
    """Write the first prompt's first two completions (text, reward, parts) to the JSONL log."""
    tokenizer = env.tokenizer
    prompt_len = int(prompts[0]["input_ids"].shape[1])
    ids = completion_ids[0]  # [G, L + C]
    scores = env.last_scores[0] if getattr(env, "last_scores", None) else []
    prompt_text = tokenizer.decode(ids[0, :prompt_len])
    for g in range(min(2, ids.shape[0])):
        parts = scores[g].parts if g < len(scores) else {}
        completion = tokenizer.decode(ids[g, prompt_len:], skip_special_tokens=True)
        samples.write(step, int(agent.index), prompt_text, completion, float(rewards[0, g]), parts)


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
        verbose: Show a progress bar and log evaluations.
        accelerator: Accepted for AgileRL compatibility (single process for now).
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

    Returns:
        The final population.

    Raises:
        ValueError: on an empty population, non-positive intervals, or only one of
            ``tournament``/``mutation``; on a malformed ``LLM_GYM_*`` cap (see the module docstring).
    """
    from tqdm.auto import tqdm

    pop = list(pop)
    if not pop:
        raise ValueError("pop is empty: give at least one agent")
    if evaluation_interval < 1:
        raise ValueError(f"evaluation_interval must be >= 1, got {evaluation_interval}")
    if (tournament is None) != (mutation is None):
        raise ValueError("give both tournament and mutation for evolution, or neither")
    evolve = tournament is not None and evo_steps is not None
    if evolve and evo_steps < 1:
        raise ValueError(f"evo_steps must be >= 1 or None, got {evo_steps}")
    if max_steps is None:
        batches = env.num_batches("train") if hasattr(env, "num_batches") else len(env)
        max_steps = batches * (num_epochs or 1)
    max_steps, eval_problems = _apply_smoke_caps(pop, max_steps, eval_problems)
    save_elite = elite_path is not None if save_elite is None else save_elite
    elite_path = elite_path or "checkpoints"
    if checkpoint_path and checkpoint_interval is None:
        checkpoint_interval = evo_steps if evolve else evaluation_interval
    if checkpoint_interval is not None and checkpoint_interval < 1:
        raise ValueError(f"checkpoint_interval must be >= 1 or None, got {checkpoint_interval}")

    run = RunState()
    start = 0
    saved_run_dir = None
    if resume_from:
        resume = Path(resume_from)
        if resume.name != "latest" and not (resume / "state.json").is_file():
            resume = resume / "latest"  # the checkpoint_path of a run (load_population repairs a killed write)
        state = load_population(resume, pop, env=env)
        start = int(state["step"])
        run = RunState.from_dict(state.get("run", {}))
        saved_run_dir = state.get("run_dir")
        if evolve and state.get("tournament"):
            tournament.load_state_dict(state["tournament"])
            mutation.load_state_dict(state["mutation"])
        logger.info("resuming at step %d of %d", start, max_steps)
    else:
        run.add_events(pop)
    if log_dir:
        run_dir = Path(log_dir)
    elif saved_run_dir:
        run_dir = Path(saved_run_dir)
    else:
        run_dir = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if wb and wandb_api_key:
        try:
            import wandb

            wandb.login(key=wandb_api_key)
        except Exception as err:  # logged by make_logger as well; the run goes on
            logger.warning("W&B login failed (%s); continuing without it", err)
    sink = loggers if loggers is not None else make_logger(run_dir, wb=wb, config={"population": len(pop)})
    samples = CompletionSampleLog(run_dir / "completions.jsonl")
    elites = EliteStore(elite_path, keep=keep_elites) if save_elite else None

    def checkpoint(step: int) -> None:
        extra = {"run": run.to_dict(), "run_dir": str(run_dir)}
        if evolve:
            extra.update(tournament=tournament.state_dict(), mutation=mutation.state_dict())
        save_population(Path(checkpoint_path) / "latest", pop, step=step, env=env, extra=extra)

    bar = tqdm(total=max_steps, initial=start, disable=not verbose, desc="training", unit="step")
    prompts = env.reset(reset_dataloaders=not resume_from and start == 0)
    step = start
    try:
        while step < max_steps:
            step_metrics: dict[str, float] = {}
            for slot, agent in enumerate(pop):
                completion_ids, action_masks = agent.get_action(prompts)
                rewards = env.score(completion_ids)
                metrics = agent.learn((completion_ids, action_masks, rewards))
                metrics.update({f"train/{k}": v for k, v in env.last_metrics().items()})
                step_metrics.update({f"agent{slot}/{k}": float(v) for k, v in metrics.items()})
                if sample_interval and step % sample_interval == 0:
                    _log_samples(samples, env, agent, step, prompts, completion_ids, rewards)
            step += 1
            means = [step_metrics.get(f"agent{s}/train/reward/total", math.nan) for s in range(len(pop))]
            step_metrics["train/reward_mean"] = sum(means) / len(means)
            step_metrics["data/epoch"] = float(getattr(env, "num_epochs", 0))
            summary = _step_summary(step_metrics, len(pop))
            # The progress bar shows these; the log line is for runs without a terminal (DEBUG).
            logger.debug("step %d | %s", step, " ".join(f"{k} {v:.3g}" for k, v in summary.items()))

            if step % evaluation_interval == 0 or step == max_steps or (evolve and step % evo_steps == 0):
                _evaluate(pop, env, step, run, eval_problems)
                fits = [a.fitness[-1] for a in pop]
                step_metrics.update({"evo/fitness_max": max(fits), "evo/fitness_mean": sum(fits) / len(fits)})
                for slot, agent in enumerate(pop):
                    step_metrics.update({f"agent{slot}/eval/{k}": v for k, v in agent.last_eval.items()})
                    step_metrics.update({f"agent{slot}/hp/{k}": float(v) for k, v in _hps(agent).items()})
                if verbose:
                    logger.info("step %d: fitness %s", step, ", ".join(f"{f:.3f}" for f in fits))
                if evolve and step % evo_steps == 0:
                    elite, pop = tournament.select(pop)
                    _save_elite(elites, elite, step, env)
                    if elite not in pop and hasattr(elite, "release"):
                        elite.release()
                    pop = mutation.mutation(pop)
                    run.add_events(pop)
                elif elites is not None and (step == max_steps):
                    best = max(pop, key=lambda a: a.fitness[-1])
                    _save_elite(elites, best, step, env)
                if max_reward is not None and max(fits) >= max_reward:
                    logger.info("best fitness %.3f reached max_reward %.3f: stopping", max(fits), max_reward)
                    max_steps = step
            sink.log(step_metrics, step)
            bar.update(1)
            bar.set_postfix(summary | {"best": max((r["fitness"] for r in run.records), default=math.nan)})
            if checkpoint_path and (step % checkpoint_interval == 0 or step == max_steps):
                checkpoint(step)
            if step < max_steps:
                prompts = env.reset()
    finally:
        bar.close()
        sink.close()
    if run.records:
        plot_learning_curve(run.records, run_dir / "learning_curve.png", events=run.events, max_fitness=max_reward)
    return pop


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


def _hps(agent: Any) -> dict[str, float]:
    hps = getattr(agent, "hps", None)
    if hps is None:
        return {}
    items = hps.items() if isinstance(hps, dict) else vars(hps).items()
    return {k: v for k, v in items if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _save_elite(elites: EliteStore | None, agent: Any, step: int, env: Any) -> None:
    if elites is None or not agent.fitness or not math.isfinite(agent.fitness[-1]):
        return
    task = getattr(env, "task", None)
    metadata = {
        "task": getattr(task, "env_id", None),
        "base_model": getattr(agent, "model_id", None),
        "hyperparameters": _hps(agent),
        "eval": dict(getattr(agent, "last_eval", {})),
        "lineage": list(getattr(agent, "lineage", [])),
    }
    path = elites.save(step, int(agent.index), float(agent.fitness[-1]), agent.write_checkpoint, metadata)
    if path is not None:
        logger.info("saved elite agent %d (fitness %.3f) to %s", agent.index, agent.fitness[-1], path)
