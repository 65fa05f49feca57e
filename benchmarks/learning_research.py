"""Research driver of issue 12: which SFT warm-up leaves GRPO a held-out greedy gain to find?

One run = SFT warm-up of the embedded tiny model (oracle or :class:`WeakTeacher` data; cached
under ``$LLM_GYM_CACHE``) -> greedy held-out exact accuracy -> one LoRA GRPO agent for a wall-time
budget, with greedy held-out evaluations along the way (their time is not in the budget) ->
one JSON line appended to ``benchmarks/results/research/<file>.jsonl``.

    export LLM_GYM_CACHE=$PWD/.cache
    .venv/bin/python -m benchmarks.learning_research --tag t1 --teacher '{"last_step": 0.6}' \\
        --sft-steps 800 --grpo-seconds 150
    # the SFT-only control at equal extra compute: the same teacher, more SFT steps, no GRPO
    .venv/bin/python -m benchmarks.learning_research --tag t1_ctl --teacher '{"last_step": 0.6}' \\
        --sft-steps 2000 --grpo-seconds 0

Every flag is a field of :class:`ResearchConfig`; ``--file`` names the jsonl (default ``runs``).

``--record-demo RUN_DIR`` instead appends the ``summary.json`` of a finished ``llm-gym train`` run
(plus ``--cpu-seconds``, the process's user+sys time from ``/usr/bin/time``) to ``demo.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.learning import LearningConfig, add_config_flags, build_agent_and_env, evaluate, sft_cache_key

logger = logging.getLogger("benchmarks.learning_research")

RESULTS = Path(__file__).parent / "results" / "research"
COUNTDOWN = "llm_gym/Countdown-v0"


@dataclass(frozen=True)
class ResearchConfig(LearningConfig):
    """One research run: a :class:`LearningConfig` (its fields mean what they mean there; ``beta`` and
    ``grpo_seconds`` default differently here) plus the teacher, the evaluation interval and the control.

    The task stays Countdown (the teacher writes Countdown solutions); GRPO runs until ``grpo_seconds``
    of training time or ``grpo_steps`` steps, whichever comes first, on ``threads`` torch threads.
    """

    beta: float = 0.0
    grpo_seconds: float = 150.0
    teacher: dict[str, float] = field(default_factory=dict)
    """Habit probabilities of the SFT teacher (``{}``: the exact oracle)."""
    eval_every_s: float = 50.0
    control_sft_steps: int = 0
    """> 0: the SFT-only control instead of GRPO -- this many more SFT steps on the same teacher's
    data (fresh cosine from ``control_sft_lr``), i.e. what SFT alone reaches with the extra compute."""
    control_sft_lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.task != COUNTDOWN:
            raise ValueError(f"ResearchConfig.task={self.task!r}: the research driver's teacher writes {COUNTDOWN} "
                             "solutions only; use benchmarks.learning for other tasks")  # fmt: skip


def cache_root() -> Path:
    """``$LLM_GYM_CACHE`` or ``~/.cache/llm_gym``."""
    env = os.environ.get("LLM_GYM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llm_gym"


def teacher_examples(config: ResearchConfig, tokenizer: Any) -> tuple[list[Any], Any]:
    """The SFT examples the run's teacher writes, and the teacher (its ``applied`` counts filled)."""
    from llm_gym.algorithms.sft import oracle_examples
    from llm_gym.registry import get_task
    from llm_gym.tasks.countdown_teacher import WeakTeacher

    teacher = WeakTeacher(config.teacher, seed=config.seed + 2)
    examples = oracle_examples(get_task(COUNTDOWN), tokenizer, size=config.sft_examples,
                               seed=config.seed + 1, solver=teacher, **config.task_kwargs)
    return examples, teacher


def control_sft(config: ResearchConfig, model_path: str) -> dict[str, Any]:
    """Continue SFT from ``model_path`` on the same teacher data; the greedy held-out eval after it."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_gym.algorithms.sft import SFTConfig, train_sft

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    examples, _ = teacher_examples(config, tokenizer)
    torch.manual_seed(config.seed + 3)
    result = train_sft(model, tokenizer, examples, SFTConfig(max_steps=config.control_sft_steps,
                                                             lr=config.control_sft_lr, batch_size=config.sft_batch_size,
                                                             seed=config.seed + 3, log_every=100))
    out = tempfile.mkdtemp(prefix="llm_gym_ctl_")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    agent, env = build_agent_and_env(config, out)
    return {"steps": result.steps, "s": round(result.seconds, 1), **_acc(evaluate(agent, env), config.test_size)}


def research_sft_model(config: ResearchConfig) -> tuple[str, dict[str, Any]]:
    """The SFT model folder (trained now or reused) and its info, teacher data included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_gym.algorithms.sft import SFTConfig, train_sft
    from llm_gym.registry import get_task
    from llm_gym.tasks.countdown import equation_reward
    from llm_gym.tasks.countdown_teacher import WeakTeacher
    from llm_gym.tiny import tiny_model_path

    source = str(tiny_model_path(config.tiny_preset, seed=config.seed))
    teacher_key = json.dumps(sorted(config.teacher.items()))
    key = sft_cache_key(f"{source}|teacher={teacher_key}", COUNTDOWN, config.task_kwargs,
                        config.sft_steps, config.sft_examples, config.sft_lr, config.sft_batch_size, config.seed)
    out = cache_root() / f"sft-research-{key}"
    info_file = out / "sft_info.json"
    if info_file.is_file():
        return str(out), {**json.loads(info_file.read_text()), "cached": True}
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    examples, teacher = teacher_examples(config, tokenizer)
    # the teacher's own exact accuracy on its data (the verifier, not the teacher, says so)
    from llm_gym.env import build_problems

    problems = build_problems(get_task(COUNTDOWN), split="train", size=config.sft_examples,
                              seed=config.seed + 1, **config.task_kwargs)
    probe = WeakTeacher(config.teacher, seed=config.seed + 2)
    scored = [equation_reward(c, **p) for p in problems if (c := probe(p)) is not None]
    torch.manual_seed(config.seed)
    result = train_sft(model, tokenizer, examples, SFTConfig(max_steps=config.sft_steps, lr=config.sft_lr,
                                                             batch_size=config.sft_batch_size, warmup_steps=20,
                                                             seed=config.seed, log_every=100))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {"seconds": result.seconds, "final_loss": result.losses[-1], "steps": result.steps,
            "teacher_accuracy": sum(scored) / len(scored), "teacher_applied": teacher.applied,
            "teacher": teacher.describe()}
    (tmp / "sft_info.json").write_text(json.dumps(info))
    tmp.rename(out)
    return str(out), {**info, "cached": False}


def _acc(metrics: dict[str, float], n: int) -> dict[str, float]:
    p = metrics["accuracy"]
    return {"acc": round(100 * p, 2), "se": round(100 * math.sqrt(max(p * (1 - p), 1e-12) / n), 2),
            "reward": round(metrics["reward/total"], 4)}


def run(config: ResearchConfig) -> dict[str, Any]:
    """SFT -> greedy eval -> GRPO with evals every ``eval_every_s`` -> the record."""
    torch.set_num_threads(config.threads)
    wall = time.perf_counter()
    model_path, sft_info = research_sft_model(config)
    agent, env = build_agent_and_env(config, model_path)
    sft_eval = _acc(evaluate(agent, env), config.test_size)
    logger.info("SFT start: %s (%s)", sft_eval, sft_info)
    curve: list[dict[str, Any]] = []
    if config.control_sft_steps > 0:
        curve.append(control_sft(config, model_path))
        logger.info("SFT-only control: %s", curve[-1])
        config = dataclasses.replace(config, grpo_seconds=0.0)
    steps, tokens, trained, rewards = 0, 0, 0.0, []
    prompts = env.reset(reset_dataloaders=True)
    next_eval = config.eval_every_s
    while trained < config.grpo_seconds and steps < config.grpo_steps:
        start = time.perf_counter()
        completion_ids, action_masks = agent.get_action(prompts)
        prompts, reward = env.step(completion_ids)
        metrics = agent.learn((completion_ids, action_masks, reward))
        trained += time.perf_counter() - start
        steps += 1
        tokens += int(sum(int(m.sum()) for m in action_masks))
        rewards.append(float(reward.mean()))
        if trained >= next_eval or trained >= config.grpo_seconds:
            point = {"step": steps, "s": round(trained, 1), **_acc(evaluate(agent, env), config.test_size),
                     "train_reward": round(sum(rewards[-50:]) / len(rewards[-50:]), 3),
                     "length": round(float(metrics.get("completion/length_mean", 0.0)), 1)}
            curve.append(point)
            logger.info("grpo %s", point)
            next_eval += config.eval_every_s
    final = curve[-1] if curve else {**sft_eval, "step": 0, "s": 0.0}
    return {
        "config": dataclasses.asdict(config),
        "sft": {**sft_info, "eval": sft_eval},
        "grpo": {"steps": steps, "seconds": round(trained, 1), "generated_tokens": tokens, "curve": curve},
        "gain_points": round(final["acc"] - sft_eval["acc"], 2),
        "best_gain_points": round(max([p["acc"] for p in curve], default=sft_eval["acc"]) - sft_eval["acc"], 2),
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: every :class:`ResearchConfig` field is a flag; ``--tag`` and ``--file`` label the record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_flags(parser, ResearchConfig)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--file", default="runs")
    parser.add_argument("--record-demo", default="", help="a finished llm-gym train run folder to record")
    parser.add_argument("--cpu-seconds", type=float, default=0.0)
    args = vars(parser.parse_args(argv))
    tag, file = args.pop("tag"), args.pop("file")
    demo, cpu = args.pop("record_demo"), args.pop("cpu_seconds")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if demo:
        summary = json.loads((Path(demo) / "summary.json").read_text())
        config = json.loads((Path(demo) / "config.json").read_text())
        gain = 100 * (summary["elite"]["accuracy"] - summary["sft"]["accuracy"])
        line = {"tag": tag, "config": config, "sft": summary["sft"], "elite": summary["elite"],
                "gain_points": round(gain, 2), "wall_seconds": round(summary["seconds"], 1), "cpu_seconds": cpu,
                "sft_data": summary.get("sft_data"), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / "demo.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")
        logger.info("%s: SFT %.3f -> elite %.3f (%+.1f points), %.0f s wall, %.0f s CPU", tag,
                    summary["sft"]["accuracy"], summary["elite"]["accuracy"], gain, summary["seconds"], cpu)
        return line
    record = {"tag": tag, **run(ResearchConfig(**args))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{file}.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    logger.info("%s: SFT %s -> %s (gain %+.2f, best %+.2f), %s s", tag, record["sft"]["eval"],
                record["grpo"]["curve"][-1] if record["grpo"]["curve"] else "-", record["gain_points"],
                record["best_gain_points"], record["wall_seconds"])
    return record


if __name__ == "__main__":
    main()
