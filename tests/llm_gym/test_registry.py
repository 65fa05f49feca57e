"""Every registered ``llm_gym/*`` env: check_env, defaults, data kwargs, golden prompts, light import.

Task envs (built from a ``Task``) and custom envs (the multi-turn TicTacToe) all pass ``check_env`` with no
warning; the problem-set tests apply to task envs.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import datasets
import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import llm_gym
from llm_gym.registry import env_description, get_task, list_envs, list_task_envs, register_env
from tests.task_data import data_kwargs

ENV_IDS = list_envs()
TASK_ENV_IDS = list_task_envs()
GENERATED_IDS = [env_id for env_id in TASK_ENV_IDS if get_task(env_id).generate is not None]  # the rest read data


def test_builtin_tasks_are_registered():
    assert {"llm_gym/Countdown-v0", "llm_gym/Subtraction-v0"} <= set(ENV_IDS)
    assert all(env_id.startswith("llm_gym/") for env_id in ENV_IDS)
    assert get_task("Countdown-v0") is get_task("llm_gym/Countdown-v0")


def test_custom_envs_are_registered_beside_the_tasks():
    assert "llm_gym/TicTacToe-v0" in ENV_IDS and "llm_gym/TicTacToe-v0" not in TASK_ENV_IDS
    assert set(TASK_ENV_IDS) == set(ENV_IDS) - {"llm_gym/TicTacToe-v0"}
    assert env_description("TicTacToe-v0") == "Play Tic-Tac-Toe over several turns against a seeded minimax opponent."
    assert env_description("llm_gym/Countdown-v0") == get_task("Countdown-v0").description
    assert gym.spec("llm_gym/TicTacToe-v0").to_json().startswith('{"id": "llm_gym/TicTacToe-v0"')
    with pytest.raises(gym.error.Error, match=r"^llm_gym/TicTacToe-v0 is not an llm_gym task environment$"):
        get_task("TicTacToe-v0")


def test_register_env_rejects_bad_registrations():
    with pytest.raises(ValueError, match=r"env id 'Game-v0' must start with 'llm_gym/'"):
        register_env("Game-v0", "llm_gym.tasks.tictactoe.env:TicTacToeEnv")
    with pytest.raises(ValueError, match=r"entry_point must be a 'module:Class' string, got 'TicTacToeEnv'"):
        register_env("llm_gym/Game-v0", "TicTacToeEnv")
    with pytest.raises(TypeError, match=r"llm_gym/Game-v0: registration kwargs must be JSON values"):
        register_env("llm_gym/Game-v0", "llm_gym.tasks.tictactoe.env:TicTacToeEnv", kwargs={"rng": object()})
    assert "llm_gym/Game-v0" not in gym.registry


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_check_env_without_warnings(env_id, tokenizer):
    data = data_kwargs(env_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kwargs in ({}, {"tokenizer": tokenizer, "render_mode": "ansi", "size": 20, "split": "test"}):
            env = gym.make(env_id, **data, **kwargs)
            env.reset(seed=0)
            env.step("x")
            check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("env_id", GENERATED_IDS)
def test_split_size_seed_kwargs(env_id):
    data_kwargs(env_id)  # skips a task whose optional extra is missing

    def problems(**kwargs):
        return list(gym.make(env_id, **kwargs).unwrapped.problems)

    train = problems(split="train", size=60, seed=5)
    assert len(train) == 60
    assert train == problems(split="train", size=60, seed=5)
    assert train != problems(split="train", size=60, seed=6)
    test = problems(split="test", size=60, seed=5)
    columns = get_task(env_id).columns
    key = lambda p: repr([p[c] for c in columns])  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in test}


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_reset_seed_gives_the_same_observation(env_id, tokenizer):
    data = data_kwargs(env_id)
    env = gym.make(env_id, tokenizer=tokenizer, **data)
    assert env.reset(seed=11) == env.reset(seed=11)
    other = gym.make(env_id, tokenizer=tokenizer, **data)
    assert other.reset(seed=11) == env.reset(seed=11)


@pytest.mark.parametrize("env_id", GENERATED_IDS)
def test_dataset_kwarg_replaces_the_generator(env_id, tmp_path):
    data_kwargs(env_id)  # skips a task whose optional extra is missing
    task = get_task(env_id)
    generated = list(gym.make(env_id, size=4, seed=0).unwrapped.problems)
    rows = [{c: p[c] for c in task.columns} for p in generated]
    data = datasets.Dataset.from_list(rows)
    assert list(gym.make(env_id, dataset=data).unwrapped.problems) == generated
    data.save_to_disk(str(tmp_path / "data"))
    assert list(gym.make(env_id, dataset=str(tmp_path / "data"), size=2).unwrapped.problems) == generated[:2]
    broken = data.rename_column(task.answer_column, f"not_{task.answer_column}")
    with pytest.raises(KeyError, match=f"{env_id} needs column '{task.answer_column}'"):
        gym.make(env_id, dataset=broken)
    env = gym.make(env_id, dataset=data)
    env.reset(options={"index": 0})
    oracle = task.solve(generated[0]) if task.solve else None
    if oracle is not None:
        _, reward, _, _, info = env.step(oracle)
        assert info["correct"] and reward == pytest.approx(task.rubric.max_total)


def test_unknown_ids_suggest_near_matches():
    with pytest.raises(gym.error.Error, match=r"no environment 'llm_gym/Countdwn-v0' is registered\. "
                       r"Did you mean llm_gym/Countdown-v0"):
        get_task("llm_gym/Countdwn-v0")
    with pytest.raises(gym.error.Error, match="Did you mean llm_gym/Subtraction-v0"):
        get_task("Subtracton-v0")


COUNTDOWN_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant. You first think about the reasoning process in your mind "
    "and then provide the user with the answer.<|im_end|>\n"
    "<|im_start|>user\nUsing each number in this list only once [44, 19, 35], create an equation that equals "
    "98. You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. Show your "
    "work in <think> </think> tags. And return the final equation and answer in <answer> </answer> tags, for "
    "example <answer>(1 + 2) / 3</answer>.<|im_end|>\n"
    "<|im_start|>assistant\nLet me solve this step by step.\n<think>"
)
SUBTRACTION_PROMPT = (
    "<|im_start|>system\nA conversation between User and Assistant. The user gives two numbers, and the "
    "Assistant returns the first number minus the second number only. The assistant first thinks about the "
    "reasoning process in the mind and then provides the user with the answer. The reasoning process and "
    "answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, on two lines, "
    "i.e., <think> reasoning process here </think> then a new line then <answer> answer here </answer>"
    "<|im_end|>\n<|im_start|>user\n850 636<|im_end|>\n"
    "<|im_start|>assistant\nLet me solve this step by step.\n<think>"
)


@pytest.mark.parametrize(
    ("env_id", "row", "prompt"),
    [
        ("llm_gym/Countdown-v0", {"nums": [44, 19, 35], "target": 98}, COUNTDOWN_PROMPT),
        ("llm_gym/Subtraction-v0", {"input": "850 636", "difference": 214}, SUBTRACTION_PROMPT),
    ],
)
def test_golden_rendered_prompt(env_id, row, prompt, tokenizer):
    env = gym.make(env_id, dataset=datasets.Dataset.from_list([row]), tokenizer=tokenizer)
    obs, _ = env.reset(seed=0)
    assert obs["prompt"] == prompt


def test_import_llm_gym_does_not_import_torch():
    code = (
        "import sys, gymnasium as gym, llm_gym; "
        "env = gym.make('llm_gym/Countdown-v0'); env.reset(seed=0); env.step('x'); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules); "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_reasoning_gym_is_exported_lazily():
    from llm_gym.reasoning_gym import ReasoningGym

    assert llm_gym.ReasoningGym is ReasoningGym
    with pytest.raises(AttributeError, match="module 'llm_gym' has no attribute 'Nope'"):
        llm_gym.Nope  # noqa: B018


@pytest.mark.parametrize("env_id", TASK_ENV_IDS)
def test_spec_serialises_with_a_string_task_reference(env_id):
    spec = gym.spec(env_id)
    assert isinstance(spec.kwargs["task"], str) and ":" in spec.kwargs["task"]
    again = gym.envs.registration.EnvSpec.from_json(spec.to_json())
    assert again == spec
    assert gym.make(again, **data_kwargs(env_id)).unwrapped.task is get_task(env_id)


def test_bad_task_reference_is_refused():
    from llm_gym.registry import load_task

    with pytest.raises(gym.error.Error, match="must be '<module>:<name>' of a llm_gym Task"):
        load_task("llm_gym.tasks.countdown:NOPE")
