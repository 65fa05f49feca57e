"""The ``llm-gym`` command line: list, eval (oracle), train with a YAML config, resume, and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llm_gym.algorithms.run.loggers import read_csv_metrics
from llm_gym.cli import main, parse_task_kwargs
from llm_gym.registry import get_task, list_task_envs
from tests.task_data import data_kwargs

ROOT = Path(__file__).resolve().parents[1]

TINY_RUN = """\
task: llm_gym/Countdown-v0
task_kwargs: {min_numbers: 3, max_numbers: 3, max_number: 9, max_target: 30}
sft_steps: 5
sft_examples: 32
sft_batch_size: 8
population: 2
train_size: 16
test_size: 4
validation_size: 4
prompts_per_step: 2
group_size: 2
max_output_tokens: 12
max_steps: 2
evo_steps: 1
evaluation_interval: 1
"""


def test_list_prints_every_registered_id(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "llm_gym/Countdown-v0" in out and "llm_gym/Subtraction-v0" in out


def test_eval_of_the_oracle_scores_full_marks(capsys):
    assert main(["eval", "--task", "llm_gym/Countdown-v0", "-n", "5"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[3].strip(): float(line.split("|")[4]) for line in out.splitlines()[2:]}
    assert str(rows.pop("mean completion tokens")) == "nan"  # the oracle reports no tokens
    assert rows == {"format": 1.0, "equation": 1.0, "total": 2.0, "exact accuracy": 1.0, "accuracy std error": 0.0,
                    "pass@1": 1.0, "rollouts": 5.0, "failed requests": 0.0}


def test_train_runs_the_pipeline_then_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "Held-out results on 4 llm_gym/Countdown-v0 problems (greedy):" in out
    assert "SFT start" in out and "elite (GRPO)" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sft"]["problems"] == 4 and set(summary["elite"]) >= {"reward/total", "accuracy"}
    assert summary["elite"]["problems"] == 4 and summary["elite_validation"]["problems"] == 4
    acc = summary["sft"]["accuracy"]
    assert summary["sft"]["accuracy_se"] == pytest.approx((acc * (1 - acc) / 4) ** 0.5)
    assert summary["gain"] == pytest.approx(summary["elite"]["accuracy"] - acc)
    assert "exact accuracy" in out and "+- s.e." in out and "gain in exact accuracy:" in out
    assert (run / "metrics.csv").is_file() and (run / "learning_curve.png").is_file()
    assert any((run / "elites").glob("elite-step*"))
    state = json.loads((run / "checkpoints" / "latest" / "state.json").read_text())
    assert state["step"] == 2

    # Resume to step 3: the run folder is found from the checkpoint, the SFT model from the cache.
    assert main(["train", "--config", str(config), "--max-steps", "3", "--resume", str(run / "checkpoints")]) == 0
    assert json.loads((run / "checkpoints" / "latest" / "state.json").read_text())["step"] == 3
    keys = [(s, k) for k, series in read_csv_metrics(run / "metrics.csv").items() for s, _ in series]
    assert len(keys) == len(set(keys)) and max(s for s, _ in keys) == 3  # every step logged once

    # Every elite and every checkpointed agent evaluates by --model, through the elite's own numbers.
    capsys.readouterr()
    elite = json.loads((run / "elites" / "index.json").read_text())[0]
    for folder in (run / "elites" / elite["path"], run / "checkpoints" / "latest" / "agent_1"):
        assert main(["eval", "--task", "llm_gym/Countdown-v0", "--model", str(folder), "-n", "4",
                     "--max-new-tokens", "12"]) == 0  # fmt: skip
        rows = _eval_rows(capsys.readouterr().out)
        assert {"format", "equation", "total", "exact accuracy", "pass@1", "failed requests"} <= set(rows)
        assert rows["failed requests"] == 0
    # The README's three lines load an elite with transformers + peft alone.
    snippet = re.search(r"# skip-test: needs a run folder[^\n]*\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    namespace = {"ELITE": str(run / "elites" / elite["path"])}
    exec(snippet.group(1), namespace)  # noqa: S102 - the README's own code
    assert type(namespace["model"]).__name__ == "PeftModelForCausalLM"
    assert len(namespace["tokenizer"]) == len(AutoTokenizer.from_pretrained(str(run / "elites" / elite["path"])))


def test_train_with_a_band_stop_ends_sft_early_and_names_its_teacher(tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "tiny.yaml"
    # any accuracy is >= 0: the first check (after SFT step 2 of 5) stops the warm-up
    config.write_text(TINY_RUN + "sft_stop_band: [0.0, 1.0]\nsft_check_every: 2\nsft_check_problems: 3\n"
                      "sft_teacher: {last_step: 0.5}\n")
    with caplog.at_level("INFO"):
        assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]) == 0
    assert "sft stopped by its callback after step 2/5" in caplog.text
    assert "SFT: 2 steps in" in caplog.text and "(stopped in the band)" in caplog.text
    assert "answer habits last_step p=0.5" in capsys.readouterr().out


def test_train_rejects_an_unknown_config_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("populaton: 4\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown train config key 'populaton'; valid keys:" in capsys.readouterr().err


def test_eval_of_a_model_uses_the_fitness_evaluation(capsys):
    """``--model`` goes through the same rollout and evaluation as an agent's fitness: same numbers."""
    from llm_gym.algorithms.rollout.policies import ModelPolicy
    from llm_gym.algorithms.rollout.rollout import evaluate
    from llm_gym.reasoning_gym import ReasoningGym
    from llm_gym.tiny import tiny_model_path

    model = str(tiny_model_path("tiny"))
    assert main(["eval", "--task", "llm_gym/Subtraction-v0", "--model", model, "-n", "3", "--max-new-tokens", "6"]) == 0
    rows = {line.split("|")[3].strip(): float(line.split("|")[4]) for line in capsys.readouterr().out.splitlines()[2:]}
    policy, tokenizer = ModelPolicy.from_pretrained(model, 6)
    env = ReasoningGym.from_task("llm_gym/Subtraction-v0", tokenizer, train_size=3, test_size=3, seed=0)
    metrics = evaluate(policy, env)
    assert metrics["problems"] == 3.0
    assert rows["total"] == pytest.approx(round(metrics["reward/total"], 3), abs=1e-3)
    assert rows["exact accuracy"] == pytest.approx(round(metrics["accuracy"], 3), abs=1e-3)


def _eval_rows(out):
    return {line.split("|")[3].strip(): float(line.split("|")[4]) for line in out.splitlines()[2:]}


ORACLE_IDS = [env_id for env_id in list_task_envs() if get_task(env_id).solve is not None]


@pytest.mark.parametrize("env_id", ORACLE_IDS)
def test_eval_of_the_oracle_scores_exact_on_every_task_with_an_oracle(env_id, tmp_path, capsys):
    data = data_kwargs(env_id)  # skips a task whose optional extra is missing
    argv = ["eval", "--task", env_id, "-n", "5"]
    if data:  # a data-only task: its local sample, saved like a user's dataset folder
        data["dataset"].save_to_disk(str(tmp_path / "data"))
        argv += ["--dataset", str(tmp_path / "data")]
    assert main(argv) == 0
    rows = _eval_rows(capsys.readouterr().out)
    assert rows["exact accuracy"] == 1.0 and rows["total"] == get_task(env_id).rubric.max_total


def test_eval_by_default_runs_the_generated_tasks_it_can_run_offline(capsys):
    assert main(["eval", "-n", "2"]) == 0
    envs = {line.split("|")[0].strip() for line in capsys.readouterr().out.splitlines()[2:]}
    assert {"llm_gym/Countdown-v0", "llm_gym/Subtraction-v0", "llm_gym/Zebra-v0"} <= envs
    assert "llm_gym/GSM8K-v0" not in envs  # data-only: needs --dataset (or the hub)


def test_task_kwargs_are_pairs_or_one_json_object(capsys):
    assert parse_task_kwargs(None) is None
    assert parse_task_kwargs(["name=leg_counting", "max_animals=3", "ratio=0.5", "flag=true", "word=a=b"]) == {
        "name": "leg_counting", "max_animals": 3, "ratio": 0.5, "flag": True, "word": "a=b"}
    assert parse_task_kwargs(['{"houses": 3, "clue_mix": {"at": 1}}']) == {"houses": 3, "clue_mix": {"at": 1}}
    assert parse_task_kwargs(['clue_mix={"same": 1}']) == {"clue_mix": {"same": 1}}
    with pytest.raises(ValueError, match="--task-kwargs takes KEY=VALUE pairs or one JSON object, got 'houses'"):
        parse_task_kwargs(["houses"])
    with pytest.raises(ValueError, match="is not a JSON object"):
        parse_task_kwargs(["{houses: 3}"])
    assert main(["eval", "--task", "llm_gym/Zebra-v0", "--task-kwargs", "3"]) == 2
    assert "llm-gym eval: --task-kwargs takes KEY=VALUE pairs" in capsys.readouterr().err
    assert main(["eval", "--task", "llm_gym/Zebra-v0", "--task-kwargs", "houses=3", "attributes=2", "-n", "3"]) == 0
    assert _eval_rows(capsys.readouterr().out)["exact accuracy"] == 1.0


def test_train_task_from_the_command_line_does_not_inherit_countdowns_knobs(monkeypatch, tmp_path):
    import llm_gym.algorithms.recipe as recipe

    seen = []
    summary = {"elite": {}, "sft": {}, "run_dir": str(tmp_path), "seconds": 0.0}
    monkeypatch.setattr(recipe, "run_training", lambda config: seen.append(config) or summary)  # no training
    for argv in (["--task", "llm_gym/Zebra-v0"], ["--task", "llm_gym/Zebra-v0", "--task-kwargs", "houses=3"],
                 ["--task", "llm_gym/Countdown-v0"], []):  # fmt: skip
        assert main(["train", *argv]) == 0
    assert [c.task_kwargs for c in seen] == [
        {}, {"houses": 3}, recipe.TrainConfig().task_kwargs, recipe.TrainConfig().task_kwargs]
    assert [c.task for c in seen] == ["llm_gym/Zebra-v0"] * 2 + ["llm_gym/Countdown-v0"] * 2
    # the default weak teacher is Countdown's: another task warms up on its own oracle
    assert [c.sft_teacher for c in seen] == [{}, {}, {"last_step": 0.6}, {"last_step": 0.6}]


def test_train_another_task_out_of_the_box(tmp_path, monkeypatch, capsys):
    """``--task llm_gym/Subtraction-v0`` with no knobs: the task's own defaults, not Countdown's."""
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "tiny.yaml"
    config.write_text("\n".join(line for line in TINY_RUN.splitlines() if not line.startswith("task")))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--task", "llm_gym/Subtraction-v0", "--output-dir", str(run)]) == 0
    assert "Held-out results on 4 llm_gym/Subtraction-v0 problems" in capsys.readouterr().out
    saved = json.loads((run / "config.json").read_text())
    assert saved["task"] == "llm_gym/Subtraction-v0" and saved["task_kwargs"] == {}


def test_help_explains_every_option_without_markup(capsys):
    for argv in (["--help"], ["eval", "--help"], ["train", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "``" not in out
    from llm_gym.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in ("eval", "train"):
        parser = sub.choices[name]
        undocumented = [a.option_strings for a in parser._actions if a.dest != "help" and not a.help]
        assert undocumented == [], (name, undocumented)


def test_train_config_rejects_a_teacher_or_band_it_cannot_use():
    from llm_gym.algorithms.recipe import TrainConfig, load_config

    with pytest.raises(ValueError, match="task llm_gym/Zebra-v0 needs sft_teacher: {}"):
        TrainConfig(task="llm_gym/Zebra-v0", sft_teacher={"last_step": 0.6})
    with pytest.raises(ValueError, match=r"sft_stop_band=\[0.5, 0.2\] must be \[low, high\]"):
        TrainConfig(sft_stop_band=[0.5, 0.2])
    assert TrainConfig(task="llm_gym/Zebra-v0").sft_teacher == {}
    assert load_config(task="llm_gym/Zebra-v0").sft_teacher == {}
    assert load_config(sft_stop_band=[0.1, 0.5]).sft_stop_band == [0.1, 0.5]
    with pytest.raises(ValueError, match="TrainConfig.mutation_sd=-0.1 must be >= 0"):
        TrainConfig(mutation_sd=-0.1)
    with pytest.raises(ValueError, match="TrainConfig.eval_batch_size=0 must be >= 1"):
        TrainConfig(eval_batch_size=0)


TICTACTOE_RUN = """\
task: llm_gym/TicTacToe-v0
task_kwargs: {}
sft_steps: 2
sft_examples: 12
sft_batch_size: 4
population: 1
train_size: 16
test_size: 2
prompts_per_step: 2
group_size: 2
max_output_tokens: 6
max_steps: 1
evaluation_interval: 1
"""


def _game_rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("random", "optimal"))}


def test_eval_of_a_game_prints_outcomes_per_opponent_for_the_oracle(capsys):
    assert main(["eval", "--task", "llm_gym/TicTacToe-v0", "-n", "20"]) == 0
    rows = _game_rows(capsys.readouterr().out)
    # games, win %, draw %, loss %, invalid games %, invalid/turn %: the oracle never loses
    assert rows["optimal"] == ["20", "0.0", "100.0", "0.0", "0.0", "0.0"]
    assert rows["random"][0] == "20" and rows["random"][3:] == ["0.0", "0.0", "0.0"]
    assert main(["eval", "--task", "llm_gym/TicTacToe-v0", "--task-kwargs", "max_turn=3"]) == 2
    assert "llm-gym eval: llm_gym/TicTacToe-v0 got unknown argument 'max_turn'" in capsys.readouterr().err


def test_train_and_eval_a_game_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "ttt.yaml"
    config.write_text(TICTACTOE_RUN)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "Held-out results on 4 llm_gym/TicTacToe-v0 problems (greedy):" in out
    assert "elite (GRPO): game/draw " in out and "optimal/not_lost" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sft"]["problems"] == 4  # 2 held-out games, each against the optimal and the random opponent
    assert {"reward/outcome", "reward/format", "reward/invalid_move", "optimal/not_lost", "random/win"} <= set(
        summary["elite"]
    )
    elite = run / "elites"  # the run's elite root: its best elite is evaluated
    assert main(["eval", "--task", "llm_gym/TicTacToe-v0", "-n", "2", "--model", str(elite),
                 "--max-new-tokens", "6"]) == 0  # fmt: skip
    rows = _game_rows(capsys.readouterr().out)
    assert rows["optimal"][0] == "2" and rows["random"][0] == "2"
