"""TicTacToe: the teacher, the SFT start and the model after multi-turn GRPO, on held-out games.

Run from the repository root::

    .venv/bin/python -m benchmarks.tictactoe                      # the defaults (= results/tictactoe_exp3.md)
    .venv/bin/python -m benchmarks.tictactoe --sft-steps 200 --rl-steps 10 --tag quick

Stages (the embedded tiny model, CPU):

1. The teacher (the oracle playing a random move 20 % and a malformed turn 5 % of the time) plays
   stratified training games; the games won or drawn with format 1 are kept and their token
   lengths reported. The teacher's own held-out results are measured on the same games as the
   models' (``evaluate_player``).
2. SFT of the tiny model on the kept games: multi-turn examples, every assistant turn trained
   (:class:`~llm_gym.multi_turn.ConversationExample`). Held-out results, greedy.
3. LoRA GRPO on the game (``make_training_env``: B prompts over opponent-strength buckets x G
   rollouts, one advantage per trajectory, env tokens masked). Held-out results, greedy.

Held-out games are test-split games ``0 .. n-1``, each against the random and the optimal
opponent. Targets (issue 14): after RL draws + wins vs optimal >= 90 %, wins vs random >= 80 %,
games with an invalid move <= 2 %, each above the SFT start and the teacher.

Writes ``benchmarks/results/tictactoe.json`` and ``tictactoe.md`` (or ``tictactoe_<tag>.*``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("benchmarks.tictactoe")

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "llm_gym"
ENV_ID = "llm_gym/TicTacToe-v0"


@dataclass(frozen=True)
class TicTacToeBenchmark:
    """One run's settings."""

    preset: str = "tiny"
    teacher_games: int = 3000
    sft_steps: int = 1000
    sft_lr: float = 3e-3
    sft_batch_size: int = 16
    rl_steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 3e-4
    beta: float = 0.0
    """KL coefficient to the SFT model."""
    temperature: float = 0.7
    invalid_move_weight: float = -0.5
    """Weight of the invalid-move part of the training reward (the env's default is -0.1); results are outcomes."""
    max_output_tokens: int = 40
    eval_games: int = 50
    seed: int = 0
    threads: int = 1


def sft_cache(config: TicTacToeBenchmark, source: str) -> Path:
    """Cache folder of the SFT model, keyed on every input that changes it."""
    key = json.dumps([source, config.teacher_games, config.sft_steps, config.sft_lr, config.sft_batch_size,
                      config.seed, "v1"])  # fmt: skip
    return CACHE / f"ttt-sft-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _rates(stats: dict[str, Any]) -> dict[str, float]:
    optimal, random = stats["optimal"], stats["random"]
    games = optimal.games + random.games
    return {
        "optimal_draw_or_win": optimal.draw_rate + optimal.win_rate,
        "optimal_draw": optimal.draw_rate,
        "random_win": random.win_rate,
        "random_loss": random.loss_rate,
        "invalid_games": (optimal.invalid_games + random.invalid_games) / games,
        "invalid_per_turn": (optimal.invalid_moves + random.invalid_moves) / max(optimal.turns + random.turns, 1),
    }


def _model_rates(policy: Any, tokenizer: Any, config: TicTacToeBenchmark) -> dict[str, float]:
    from llm_gym.algorithms.rollout.multi_turn import play_held_out
    from llm_gym.tasks.tictactoe.training import make_training_env, stats_from_records

    env = make_training_env(tokenizer, data_batch_size_per_gpu=20, test_games=config.eval_games, seed=config.seed)
    return _rates(stats_from_records(play_held_out(policy, env)))


def run(config: TicTacToeBenchmark) -> dict[str, Any]:
    """All three stages; returns the record written to the results."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_gym.algorithms.grpo.agent import GRPO
    from llm_gym.algorithms.rollout.policies import ModelPolicy
    from llm_gym.algorithms.rollout.rollout import rollout
    from llm_gym.algorithms.sft import SFTConfig, length_report, train_sft
    from llm_gym.tasks.tictactoe import Player, evaluate_player
    from llm_gym.tasks.tictactoe.training import make_training_env, sft_examples
    from llm_gym.tiny import tiny_model_path

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    source = tiny_model_path(config.preset, seed=config.seed, env_ids=[ENV_ID])
    tokenizer = AutoTokenizer.from_pretrained(source)
    examples = sft_examples(config.teacher_games, seed=config.seed + 1)
    report = length_report(examples, tokenizer, seq_len=700)
    teacher = _rates(evaluate_player(Player.teacher(seed=config.seed), num_games=config.eval_games, seed=config.seed))

    cache = sft_cache(config, str(source))
    if (cache / "config.json").is_file():  # the same SFT run done before: reuse it (marked in the results)
        logger.info("SFT model reused from %s", cache)
        model = AutoModelForCausalLM.from_pretrained(cache)
        saved = json.loads((cache / "sft_run.json").read_text())
        sft_seconds, sft_loss, reused = saved["seconds"], saved["final_loss"], True
    else:
        model = AutoModelForCausalLM.from_pretrained(source)
        t0 = time.perf_counter()
        sft = train_sft(model, tokenizer, examples, SFTConfig(max_steps=config.sft_steps, lr=config.sft_lr,
                        batch_size=config.sft_batch_size, warmup_steps=20, seq_len=1024, seed=config.seed))  # fmt: skip
        sft_seconds, sft_loss, reused = time.perf_counter() - t0, sft.losses[-1], False
        model.save_pretrained(cache)
        (cache / "sft_run.json").write_text(json.dumps({"seconds": sft_seconds, "final_loss": sft_loss}))
    policy = ModelPolicy(model, tokenizer.pad_token_id, config.max_output_tokens)
    policy.max_model_len = 1024
    sft_rates = _model_rates(policy, tokenizer, config)
    logger.info("SFT start: %s", sft_rates)

    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM", lora_dropout=0.0)
    agent = GRPO(actor_network=model, pad_token_id=tokenizer.pad_token_id, lora_config=lora, device="cpu",
                 group_size=config.group_size, batch_size=config.prompts_per_step * config.group_size,
                 max_output_tokens=config.max_output_tokens, max_model_len=1024, lr=config.lr, beta=config.beta,
                 temperature=config.temperature, seed=config.seed)  # fmt: skip
    env = make_training_env(tokenizer, data_batch_size_per_gpu=config.prompts_per_step, seed=config.seed,
                            invalid_move_weight=config.invalid_move_weight)  # fmt: skip
    curve = []
    t0 = time.perf_counter()
    prompts = env.reset()
    for step in range(config.rl_steps):
        batch = rollout(agent, env, prompts)
        metrics = agent.learn(batch.experience)
        curve.append({"step": step + 1, **{k: batch.metrics[k] for k in ("reward/total", "reward/outcome",
                      "reward/format", "game/invalid_games", "game/loss")}, "loss": metrics["loss"]})  # fmt: skip
        logger.info("rl step %d: %s", step + 1, curve[-1])
        prompts = env.reset()
    rl_seconds = time.perf_counter() - t0
    rl_rates = _model_rates(agent, tokenizer, config)
    logger.info("after RL: %s", rl_rates)
    record = {
        "config": dataclasses.asdict(config),
        "sft_data": {"kept": report.count, "played": config.teacher_games, "longest": report.max_length,
                     "fit_700": report.fit_fraction},  # fmt: skip
        "teacher": teacher,
        "sft": sft_rates,
        "rl": rl_rates,
        "sft_seconds": sft_seconds,
        "sft_final_loss": sft_loss,
        "sft_reused": reused,
        "rl_seconds": rl_seconds,
        "total_seconds": time.perf_counter() - start,
        "curve": curve,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {config.threads} thread(s)",
    }
    record["targets"] = targets(record)
    return record


def targets(record: dict[str, Any]) -> dict[str, bool]:
    """The issue's targets, each True when met."""
    rl, sft, teacher = record["rl"], record["sft"], record["teacher"]
    return {
        "optimal_draw_or_win >= 0.90": rl["optimal_draw_or_win"] >= 0.90,
        "random_win >= 0.80": rl["random_win"] >= 0.80,
        "invalid_games <= 0.02": rl["invalid_games"] <= 0.02,
        "above SFT start": rl["optimal_draw_or_win"] > sft["optimal_draw_or_win"] and rl["random_win"] > sft["random_win"]
        and rl["invalid_games"] < sft["invalid_games"],
        "above the teacher": rl["optimal_draw_or_win"] > teacher["optimal_draw_or_win"]
        and rl["random_win"] > teacher["random_win"] and rl["invalid_games"] < teacher["invalid_games"],
    }


def to_markdown(record: dict[str, Any]) -> str:
    """The results page."""
    rows = [("teacher", record["teacher"]), ("SFT start", record["sft"]), ("after RL", record["rl"])]
    lines = [
        "# TicTacToe: teacher vs SFT start vs after RL (held-out games)", "",
        f"Settings: `{json.dumps(record['config'])}`", "",
        f"SFT data: {record['sft_data']['kept']} of {record['sft_data']['played']} teacher games kept (won or drawn, "
        f"format 1); longest {record['sft_data']['longest']} tokens; "
        f"{100 * record['sft_data']['fit_700']:.2f} % fit in 700.", "",
        "| player | draws+wins vs optimal | wins vs random | losses vs random | games with an invalid move "
        "| invalid moves per turn |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in rows:
        lines.append(f"| {name} | {100 * r['optimal_draw_or_win']:.1f} % | {100 * r['random_win']:.1f} % | "
                     f"{100 * r['random_loss']:.1f} % | {100 * r['invalid_games']:.1f} % | "
                     f"{100 * r['invalid_per_turn']:.1f} % |")  # fmt: skip
    lines += ["", f"Wall time: SFT {record['sft_seconds']:.0f} s (final loss {record['sft_final_loss']:.3f})"
              f"{' (reused from the cache: the time of the run that trained it)' if record['sft_reused'] else ''}, "
              f"RL {record['rl_seconds']:.0f} s, total {record['total_seconds']:.0f} s on {record['machine']}.", "",
              "Targets: " + ", ".join(f"{k}: {'met' if v else 'missed'}" for k, v in record["targets"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: every field of :class:`TicTacToeBenchmark` as ``--field``, plus ``--tag``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(TicTacToeBenchmark):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--tag", default="", help="results go to tictactoe_<tag>.json/.md")
    args = vars(parser.parse_args(argv))
    tag = args.pop("tag")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    record = run(TicTacToeBenchmark(**args))
    name = f"tictactoe_{tag}" if tag else "tictactoe"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2))
    (RESULTS / f"{name}.md").write_text(to_markdown(record))
    print(to_markdown(record))
    return record


if __name__ == "__main__":
    main()
