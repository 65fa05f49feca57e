"""Does GRPO teach the tiny model something SFT did not? Held-out exact accuracy before and after.

Run from the repository root::

    .venv/bin/python -m benchmarks.learning                 # the defaults (~7 minutes, SFT cached after)
    .venv/bin/python -m benchmarks.learning --grpo-seconds 60 --sft-steps 200   # a quick look
    .venv/bin/python -m benchmarks.learning --seeds 3       # seeds 0, 1, 2: gain per seed, mean +- s.e.
    .venv/bin/python -m benchmarks.learning --quick         # a smoke run of seconds (tiny budgets)

Stages:

1. SFT warm-up of the embedded tiny model on oracle solutions (full fine-tune). The SFT model is
   cached in ``~/.cache/llm_gym/sft-<hash>`` keyed on every input that changes it (model folder,
   task, knobs, steps, examples, lr, batch, seed); its time is NOT part of the GRPO budget, and a
   reused cache is logged and marked in the results.
2. Held-out exact accuracy (and mean reward) of the SFT model: greedy, fixed test problems.
3. One LoRA GRPO agent trains until ``--grpo-steps`` steps or ``--grpo-seconds`` of wall time,
   whichever comes first (the budget is checked between steps; evaluation time is not counted).
4. Held-out accuracy of the GRPO model on the same problems.

Writes ``benchmarks/results/learning.json`` and ``learning.md`` (or ``learning_<tag>.*``); with
``--seeds N`` one record per seed (``seed`` = ``--seed`` + k, SFT included) and a table of the gain
per seed with the mean and its standard error over seeds.
Peak memory is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak resident set of the whole
process, MiB), not tracemalloc: tensors are allocated outside Python's allocator.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("benchmarks.learning")

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "llm_gym"


@dataclass(frozen=True)
class LearningConfig:
    """One benchmark run: task, SFT warm-up and GRPO hyper-parameters."""

    task: str = "llm_gym/Countdown-v0"
    task_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"min_numbers": 3, "max_numbers": 3, "max_number": 9, "max_target": 30}
    )
    tiny_preset: str = "tiny"
    sft_steps: int = 800
    sft_examples: int = 4000
    sft_lr: float = 3e-3
    sft_batch_size: int = 32
    test_size: int = 200
    train_size: int = 4000
    prompts_per_step: int = 4
    group_size: int = 16
    max_output_tokens: int = 40
    lr: float = 3e-4
    beta: float = 0.04
    temperature: float = 0.7
    loss_type: str = "grpo"
    lora_r: int = 16
    grpo_steps: int = 10_000
    grpo_seconds: float = 300.0
    seed: int = 0
    threads: int = 1
    validation_size: int = 0
    """Validation problems of the env (0: none; the training problems are then as before)."""


QUICK = {"sft_steps": 10, "sft_examples": 64, "sft_batch_size": 8, "test_size": 8, "train_size": 32,
         "prompts_per_step": 2, "group_size": 4, "max_output_tokens": 12, "grpo_steps": 2, "grpo_seconds": 60.0}
"""``--quick``: budgets of a smoke run (seconds); the numbers it reports mean nothing."""


def seed_summary(gains: list[float]) -> dict[str, float]:
    """Mean and standard error (sample std / sqrt(n)) of per-seed gains.

    Example:
        >>> seed_summary([1.0, 2.0, 6.0])
        {'seeds': 3, 'mean': 3.0, 'se': 1.5275252316519465}
    """
    n = len(gains)
    mean = sum(gains) / n
    var = sum((g - mean) ** 2 for g in gains) / (n - 1) if n > 1 else float("nan")
    return {"seeds": n, "mean": mean, "se": (var / n) ** 0.5}


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sft_cache_key(source: str, task: str, task_kwargs: dict[str, Any], steps: int, examples: int, lr: float,
                  batch_size: int, seed: int) -> str:  # fmt: skip
    """Hash of every input that changes an SFT warm-up's result.

    Args:
        source: The starting model folder (its name holds the tiny preset's hash).
        task: Environment id.
        task_kwargs: Task knobs.
        steps: SFT optimizer steps.
        examples: Number of oracle examples.
        lr: Peak learning rate.
        batch_size: Examples per step.
        seed: Seed of data and order.

    Returns:
        A 16-hex-digit key.
    """
    blob = json.dumps([source, task, sorted(task_kwargs.items()), steps, examples, lr, batch_size, seed, "v1"])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sft_model(config: LearningConfig, cache: Path | None = CACHE) -> tuple[str, dict[str, Any]]:
    """The SFT-warmed model folder, trained now or reused from the cache.

    Args:
        config: The run (its ``sft_*`` fields, task, knobs, preset and seed matter).
        cache: Cache root; ``None`` trains into a fresh temporary folder every time.

    Returns:
        ``(model folder, {"seconds": SFT wall time, "cached": bool, "final_loss": float})``.
    """
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_gym.algorithms.sft import SFTConfig, length_report, oracle_examples, train_sft
    from llm_gym.registry import get_task
    from llm_gym.tiny import tiny_model_path

    source = str(tiny_model_path(config.tiny_preset, seed=config.seed))
    key = sft_cache_key(source, config.task, config.task_kwargs, config.sft_steps, config.sft_examples,
                        config.sft_lr, config.sft_batch_size, config.seed)  # fmt: skip
    out = (cache / f"sft-{key}") if cache is not None else Path(tempfile.mkdtemp(prefix="llm_gym_sft_"))
    info_file = out / "sft_info.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        logger.info("reusing cached SFT model %s (%d steps, trained in %.1fs)", out, config.sft_steps, info["seconds"])
        return str(out), {**info, "cached": True}
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    examples = oracle_examples(get_task(config.task), tokenizer, size=config.sft_examples, seed=config.seed + 1,
                               **config.task_kwargs)  # fmt: skip
    length_report(examples, tokenizer, seq_len=512)
    torch.manual_seed(config.seed)
    result = train_sft(model, tokenizer, examples, SFTConfig(max_steps=config.sft_steps, lr=config.sft_lr,
                                                             batch_size=config.sft_batch_size, warmup_steps=20,
                                                             seed=config.seed, log_every=50))  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {"seconds": result.seconds, "final_loss": result.losses[-1], "steps": result.steps}
    (tmp / "sft_info.json").write_text(json.dumps(info))
    tmp.rename(out)
    return str(out), {**info, "cached": False}


def build_agent_and_env(config: LearningConfig, model_path: str) -> tuple[Any, Any]:
    """One LoRA GRPO agent on ``model_path`` and the ReasoningGym of the run's task."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from llm_gym.algorithms.grpo.agent import GRPO
    from llm_gym.reasoning_gym import ReasoningGym

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    env = ReasoningGym.from_task(config.task, tokenizer, train_size=config.train_size, test_size=config.test_size,
                                 validation_size=config.validation_size, seed=config.seed,
                                 data_batch_size_per_gpu=config.prompts_per_step, **config.task_kwargs)  # fmt: skip
    lora = LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules="all-linear",
                      task_type="CAUSAL_LM", lora_dropout=0.0)  # fmt: skip
    agent = GRPO(model_path, pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, lora_config=lora,
                 batch_size=config.prompts_per_step * config.group_size, group_size=config.group_size,
                 max_output_tokens=config.max_output_tokens, lr=config.lr, beta=config.beta,
                 temperature=config.temperature, loss_type=config.loss_type, seed=config.seed,
                 device="cpu")  # fmt: skip
    return agent, env


def evaluate(agent: Any, env: Any) -> dict[str, float]:
    """Greedy held-out metrics (``accuracy``, ``reward/total``, parts) on every test problem."""
    agent.test(env)
    agent.fitness.pop()
    return dict(agent.last_eval)


def train_grpo(agent: Any, env: Any, steps: int, seconds: float, tokens_budget: float | None = None) -> dict[str, Any]:
    """Train ``agent`` until ``steps`` steps, ``seconds`` of wall time or ``tokens_budget`` generated tokens
    (each checked between steps).

    Returns:
        ``{"steps", "seconds", "generated_tokens", "reward_curve"}`` (mean training reward per 10 steps).
    """
    start = time.perf_counter()
    prompts = env.reset(reset_dataloaders=True)
    done, tokens, rewards = 0, 0, []
    while done < steps and time.perf_counter() - start < seconds and (tokens_budget is None or tokens < tokens_budget):
        completion_ids, action_masks = agent.get_action(prompts)
        prompts, reward = env.step(completion_ids)
        metrics = agent.learn((completion_ids, action_masks, reward))
        tokens += int(sum(int(m.sum()) for m in action_masks))
        rewards.append(float(metrics["reward/mean"]) if "reward/mean" in metrics else float(reward.mean()))
        done += 1
        if done % 25 == 0:
            logger.info("grpo step %d (%.0fs): train reward %.3f, length %.1f", done, time.perf_counter() - start,
                        sum(rewards[-25:]) / 25, metrics["completion/length_mean"])  # fmt: skip
    curve = [round(sum(rewards[i : i + 10]) / len(rewards[i : i + 10]), 4) for i in range(0, len(rewards), 10)]
    return {"steps": done, "seconds": time.perf_counter() - start, "generated_tokens": tokens, "reward_curve": curve}


def run(config: LearningConfig, cache: Path | None = CACHE) -> dict[str, Any]:
    """SFT (cached) -> evaluate -> GRPO -> evaluate; returns the result record."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        start = time.perf_counter()
        model_path, sft_info = sft_model(config, cache)
        agent, env = build_agent_and_env(config, model_path)
        sft_eval = evaluate(agent, env)
        logger.info("SFT model: accuracy %.3f, reward %.3f", sft_eval["accuracy"], sft_eval["reward/total"])
        training = train_grpo(agent, env, config.grpo_steps, config.grpo_seconds)
        grpo_eval = evaluate(agent, env)
        logger.info("GRPO model after %d steps (%.0fs): accuracy %.3f, reward %.3f", training["steps"],
                    training["seconds"], grpo_eval["accuracy"], grpo_eval["reward/total"])  # fmt: skip
        return {
            "config": dataclasses.asdict(config),
            "sft": {**sft_info, "eval": sft_eval},
            "grpo": {**training, "eval": grpo_eval},
            "accuracy_gain_points": 100 * (grpo_eval["accuracy"] - sft_eval["accuracy"]),
            "total_seconds": time.perf_counter() - start,
            "peak_rss_mib": peak_rss_mib(),
            "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(),
                        "torch": torch.__version__},  # fmt: skip
        }
    finally:
        torch.set_num_threads(previous_threads)


def to_markdown(record: dict[str, Any]) -> str:
    """A short markdown table of one result record."""
    c, s, g = record["config"], record["sft"], record["grpo"]
    rows = [
        ("task", f"{c['task']} {c['task_kwargs']}"),
        ("SFT", f"{c['sft_steps']} steps x {c['sft_batch_size']} (lr {c['sft_lr']}), {s['seconds']:.0f}s"
                f"{' (cached, not in the GRPO budget)' if s['cached'] else ' (not in the GRPO budget)'}"),
        ("GRPO", f"{g['steps']} steps in {g['seconds']:.0f}s; {c['prompts_per_step']} prompts x {c['group_size']}, "
                 f"lr {c['lr']}, beta {c['beta']}, T {c['temperature']}, {c['loss_type']}, "
                 f"max {c['max_output_tokens']} tokens, LoRA r{c['lora_r']}"),
        ("held-out exact accuracy, SFT", f"{100 * s['eval']['accuracy']:.1f} % ({c['test_size']} problems, greedy)"),
        ("held-out exact accuracy, GRPO", f"{100 * g['eval']['accuracy']:.1f} %"),
        ("gain", f"{record['accuracy_gain_points']:+.1f} points"),
        ("held-out mean reward SFT -> GRPO", f"{s['eval']['reward/total']:.3f} -> {g['eval']['reward/total']:.3f}"),
        ("peak RSS (ru_maxrss)", f"{record['peak_rss_mib']:.0f} MiB"),
        ("threads / seed", f"{c['threads']} / {c['seed']}"),
    ]  # fmt: skip
    return "| quantity | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def seeds_markdown(records: list[dict[str, Any]]) -> str:
    """Gain in held-out exact accuracy per seed, then the mean +- standard error over seeds."""
    lines = ["| seed | SFT exact acc. | GRPO exact acc. | gain (points) | GRPO steps / s |", "|---|---|---|---|---|"]
    for r in records:
        s, g = r["sft"]["eval"], r["grpo"]
        lines.append(f"| {r['config']['seed']} | {100 * s['accuracy']:.1f} % | {100 * g['eval']['accuracy']:.1f} % | "
                     f"{r['accuracy_gain_points']:+.1f} | {g['steps']} / {g['seconds']:.0f} |")  # fmt: skip
    summary = seed_summary([r["accuracy_gain_points"] for r in records])
    lines.append(f"\nmean gain over {summary['seeds']} seeds: {summary['mean']:+.1f} +- {summary['se']:.1f} points "
                 f"(s.e. over seeds; {records[0]['config']['test_size']} test problems each)")  # fmt: skip
    return "\n".join(lines) + "\n"


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One ``--flag`` per field of the dataclass ``config_class``, defaulting to the field's default.

    A dict field takes JSON (``--task-kwargs '{"max_number": 9}'``); any other field its default's type.
    """
    defaults = config_class()
    for f in dataclasses.fields(config_class):
        value = getattr(defaults, f.name)
        kind = json.loads if isinstance(value, dict) else type(value)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=value)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point: every :class:`LearningConfig` field is a ``--flag``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_flags(parser, LearningConfig)
    parser.add_argument("--tag", default="", help="results go to learning_<tag>.json/.md")
    parser.add_argument("--no-cache", action="store_true", help="train the SFT model afresh")
    parser.add_argument("--seeds", type=int, default=1, help="seeds --seed .. --seed + N - 1 (SFT included)")
    parser.add_argument("--quick", action="store_true", help="smoke-run budgets (QUICK); numbers mean nothing")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the json/md results go")
    args = vars(parser.parse_args(argv))
    tag, no_cache, seeds, quick, results = (args.pop(k) for k in ("tag", "no_cache", "seeds", "quick", "results_dir"))
    if seeds < 1:
        parser.error(f"--seeds {seeds}: give at least 1 seed")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = LearningConfig(**{**args, **(QUICK if quick else {})})
    records = [run(dataclasses.replace(config, seed=config.seed + k), cache=None if no_cache else CACHE)
               for k in range(seeds)]  # fmt: skip
    results.mkdir(parents=True, exist_ok=True)
    stem = f"learning_{tag}" if tag else "learning"
    if seeds == 1:
        record = records[0]
        (results / f"{stem}.json").write_text(json.dumps(record, indent=2))
        (results / f"{stem}.md").write_text(to_markdown(record))
        logger.info("\n%s", to_markdown(record))
        return record
    summary = seed_summary([r["accuracy_gain_points"] for r in records])
    record = {"seeds": records, "gain_points": summary}
    (results / f"{stem}_seeds.json").write_text(json.dumps(record, indent=2))
    (results / f"{stem}_seeds.md").write_text(seeds_markdown(records))
    logger.info("\n%s", seeds_markdown(records))
    return record


if __name__ == "__main__":
    main()
