"""ReasoningEnv on the toy Double task: spaces, seeding, step results, data sources, check_env."""

from __future__ import annotations

import time
import warnings

import datasets
import gymnasium as gym
import pytest
from conftest import DOUBLE_ENV_ID
from gymnasium.utils.env_checker import check_env

from llm_gym.env import ReasoningEnv, build_problems
from llm_gym.rubric import Rubric


@pytest.fixture
def env(double_task):
    return ReasoningEnv(double_task, size=50, seed=3)


def _record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_check_env_passes_without_warnings(double_task, tokenizer, with_tokenizer):
    kwargs = {"tokenizer": tokenizer} if with_tokenizer else {}

    def run():
        env = gym.make(DOUBLE_ENV_ID, size=20, render_mode="ansi", **kwargs)
        env.reset(seed=1)
        env.step("4</answer>")
        check_env(env.unwrapped)

    assert _record(run) == []


def test_reset_is_deterministic_through_np_random(env):
    first = [env.reset(seed=s) for s in (0, 1, 2)]
    again = [env.reset(seed=s) for s in (0, 1, 2)]
    assert first == again
    env.reset(seed=7)
    unseeded = [env.reset()[1]["problem_index"] for _ in range(20)]
    env.reset(seed=7)
    assert [env.reset()[1]["problem_index"] for _ in range(20)] == unseeded
    assert len(set(unseeded)) > 5  # draws vary across episodes


def test_observation_and_step(double_task, tokenizer):
    env = ReasoningEnv(double_task, size=10, tokenizer=tokenizer)
    obs, info = env.reset(options={"index": 4})
    problem = env.problems[4]
    n = problem["n"]
    assert obs["messages"] == (
        {"role": "system", "content": "Reply with twice the number."},
        {"role": "user", "content": f"Double {n}."},
        {"role": "assistant", "content": "<answer>"},
    )
    assert obs["prompt"] == (
        "<|im_start|>system\nReply with twice the number.<|im_end|>\n"
        f"<|im_start|>user\nDouble {n}.<|im_end|>\n<|im_start|>assistant\n<answer>"
    )
    assert env.observation_space.contains(obs)
    assert info == {"problem_index": 4}

    obs, reward, terminated, truncated, info = env.step(f"{2 * n}</answer>")
    assert (reward, terminated, truncated) == (1.5, True, False)  # 0.5 * format + 1.0 * correct
    assert type(reward) is float and type(terminated) is bool and type(truncated) is bool
    assert info == {
        "n": n, "target": 2 * n, "rewards": {"format": 1.0, "correct": 1.0}, "reward_errors": {},
        "correct": True, "problem_index": 4,
    }
    assert obs["messages"][-1] == {"role": "assistant", "content": f"<answer>{2 * n}</answer>"}
    assert obs["prompt"].endswith(f"<|im_start|>assistant\n<answer>{2 * n}</answer>")
    assert env.observation_space.contains(obs)

    env.reset(options={"index": 4})
    _, reward, _, _, info = env.step(f"{2 * n + 1}</answer> extra")
    assert reward == 0.0 and info["rewards"] == {"format": 0.0, "correct": 0.0} and not info["correct"]
    env.reset(options={"index": 4})
    assert env.step(f"{2 * n + 1}</answer>")[1] == 0.5


def test_step_errors(env):
    with pytest.raises(RuntimeError, match=r"^call reset\(\) before step\(\)$"):
        env.step("x")
    env.reset(seed=0)
    with pytest.raises(TypeError, match=r"^the action is the completion text \(str\), got int$"):
        env.step(3)


def test_render_ansi(double_task):
    env = ReasoningEnv(double_task, size=5, render_mode="ansi")
    assert env.render() is None
    env.reset(options={"index": 0})
    n = env.problems[0]["n"]
    assert env.render() == f"[system] Reply with twice the number.\n[user] Double {n}.\n[assistant] <answer>"
    with pytest.raises(ValueError, match=r"^render_mode must be one of \['ansi'\], got 'human'$"):
        ReasoningEnv(double_task, render_mode="human")


def test_hanging_reward_scores_zero_and_the_episode_ends(double_task):
    def stuck(completion, **_):
        while True:
            pass

    env = ReasoningEnv(double_task, size=5, rubric=Rubric([stuck], timeout=0.2))
    env.reset(seed=0)
    start = time.monotonic()
    _, reward, terminated, _, info = env.step("1</answer>")
    assert time.monotonic() - start < 1.5
    assert (reward, terminated, info["reward_errors"]) == (0.0, True, {"stuck": "timed out after 0.2s"})


def test_construction_is_cheap(double_task):
    # The ~63k-character Text spaces are built once and copied: an env costs milliseconds.
    start = time.perf_counter()
    for _ in range(20):
        ReasoningEnv(double_task, size=5)
    assert time.perf_counter() - start < 1.0


def test_spaces_sample_and_contain_quickly(env):
    env.action_space.seed(0)
    env.observation_space.seed(0)
    start = time.perf_counter()
    action = env.action_space.sample()
    obs = env.observation_space.sample()
    assert env.action_space.contains(action) and env.observation_space.contains(obs)
    assert not env.action_space.contains("\x00")  # control characters are outside the charset
    assert time.perf_counter() - start < 1.0


def test_dataset_in_place_of_the_generator(double_task, tmp_path):
    # A single Dataset has no test split: its problems are split by hash, 20 % test, never shared.
    rows = [{"n": n, "target": 2 * n, "extra": "a"} for n in range(1, 41)]
    data = datasets.Dataset.from_list(rows)
    train = ReasoningEnv(double_task, dataset=data, split="train")
    test = ReasoningEnv(double_task, dataset=data, split="test")
    train_ns = [p["n"] for p in train.problems]
    test_ns = [p["n"] for p in test.problems]
    assert sorted(train_ns + test_ns) == list(range(1, 41))
    assert 0 < len(test_ns) < len(train_ns)
    first = train.problems[0]
    assert first == {"n": first["n"], "target": 2 * first["n"], "question": first["n"], "answer": 2 * first["n"]}
    train.reset(options={"index": 0})
    assert train.step(f"{2 * first['n']}</answer>")[1] == 1.5

    data.save_to_disk(str(tmp_path / "double"))
    from_disk = ReasoningEnv(double_task, dataset=tmp_path / "double", split="train", size=1)
    assert list(from_disk.problems) == [first]
    assert [p["n"] for p in ReasoningEnv(double_task, dataset=str(tmp_path / "double"), split="test").problems] == test_ns


def test_dataset_dict_takes_the_split(double_task):
    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"n": 1, "target": 2}]),
        "test": datasets.Dataset.from_list([{"n": 3, "target": 6}]),
    })
    assert build_problems(double_task, dataset=data, split="test")[0]["n"] == 3
    assert build_problems(double_task, dataset=data, split="train")[0]["n"] == 1


def test_missing_column_error(double_task):
    data = datasets.Dataset.from_list([{"n": 1, "answer": 2}])
    with pytest.raises(
        KeyError,
        match=r"llm_gym/Double-v0 needs column 'target'; the dataset has columns \['answer', 'n'\]\. "
        r"Rename columns to the task's schema \['n', 'target'\] \(Dataset.rename_column\)",
    ):
        ReasoningEnv(double_task, dataset=data)


def test_unknown_knob_error(double_task):
    with pytest.raises(TypeError, match=r"llm_gym/Double-v0 got unknown argument 'hgh'; its knobs are \['high'\]"):
        ReasoningEnv(double_task, hgh=3)
    env = ReasoningEnv(double_task, high=3, size=30)
    assert {p["n"] for p in env.problems} <= {0, 1, 2}


def test_rubric_override_accepts_a_seed_style_callable(double_task):
    env = ReasoningEnv(double_task, size=5, rubric=lambda completion, answer, question: float(answer == 2 * question))
    env.reset(seed=0)
    _, reward, _, _, info = env.step("anything")
    assert reward == 1.0 and info["rewards"] == {"<lambda>": 1.0} and info["correct"] is False


def test_a_dataset_handed_over_without_a_split_is_the_env(double_task):
    """gym.make with a 1-row Dataset gives an env over that row, whichever side of the hash split it lies."""
    for n in range(1, 6):  # some of these hash into the test share, some into train
        env = gym.make(DOUBLE_ENV_ID, dataset=datasets.Dataset.from_list([{"n": n, "target": 2 * n}]))
        assert [p["n"] for p in env.unwrapped.problems] == [n]
        env.reset(seed=0)
        assert env.step(f"{2 * n}</answer>")[1] == 1.5


def test_an_empty_hash_split_names_its_cause(double_task):
    from llm_gym.problems import problem_key, split_of
    from llm_gym.usage import UsageError

    n = next(n for n in range(100) if split_of(problem_key({"n": n, "target": 2 * n}, ["n", "target"]), 0.2) == "train")
    data = datasets.Dataset.from_list([{"n": n, "target": 2 * n}] * 30)
    with pytest.raises(UsageError, match=r"^the 'test' split of the data is empty: the data has no test split, so its "
                       r"problems are split by hash \(20% test\), and none of its 1 distinct problems \(30 rows\) falls "
                       r"in 'test'; give a DatasetDict with a 'test' split, more distinct problems, or "
                       r"split='train' \(--split\)$"):  # fmt: skip
        build_problems(double_task, dataset=data, split="test")
    assert len(build_problems(double_task, dataset=data, split="train")) == 30
