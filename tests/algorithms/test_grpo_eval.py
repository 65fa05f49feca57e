"""GRPO.test: greedy fitness on ReasoningGym's test split, without disturbing training."""

from __future__ import annotations

import pytest
import torch
from grpo_tiny import make_agent, make_tokenizer, single_thread

from llm_gym.reasoning_gym import ReasoningGym

_one_thread = pytest.fixture(autouse=True)(single_thread)

TEMPLATE = [{"role": "user", "content": "Solve {question}"}]


def _env(calls):
    def reward(completion, answer, question):
        value = float(len(completion) % 2)  # any deterministic function of the completion
        calls.append((answer, value))
        return value

    train = [{"question": f"t{i}", "answer": f"train{i}"} for i in range(6)]
    test = [{"question": f"x{i}", "answer": f"test{i}"} for i in range(5)]
    return ReasoningGym(train, test, make_tokenizer(), reward, TEMPLATE, data_batch_size_per_gpu=2)


def test_fitness_is_the_mean_reward_over_every_test_problem_once():
    calls = []
    env = _env(calls)
    agent = make_agent(max_output_tokens=5)
    train_prompts = env.reset()  # a training batch is pending while we evaluate
    fitness = agent.test(env)
    answers = [a for a, _ in calls]
    assert sorted(answers) == [f"test{i}" for i in range(5)]  # all 5 test problems, each exactly once
    assert fitness == pytest.approx(sum(v for _, v in calls) / 5, abs=1e-9)
    assert agent.fitness == [fitness]
    assert agent.last_eval["problems"] == 5.0
    assert agent.last_eval["reward/total"] == pytest.approx(fitness, abs=1e-9)

    # the pending training batch is untouched: its completions score against training answers
    calls.clear()
    completions, _ = agent.get_action(train_prompts)
    _, rewards = env.step(completions)
    assert rewards.shape == (2, 4)
    assert {a for a, _ in calls} <= {f"train{i}" for i in range(6)} and len(calls) == 8

    # greedy evaluation is repeatable
    calls.clear()
    assert agent.test(env) == fitness and len(agent.fitness) == 2


def test_max_problems_rounds_up_to_whole_batches():
    calls = []
    env = _env(calls)
    agent = make_agent(max_output_tokens=3)
    agent.test(env, max_problems=3)
    assert sorted(a for a, _ in calls) == ["test0", "test1", "test2", "test3"]  # batches of 2
    assert agent.last_eval["problems"] == 4.0


def test_evaluation_uses_greedy_single_completions(monkeypatch):
    env = _env([])
    agent = make_agent(max_output_tokens=3)
    seen = []
    real = agent.get_action

    def spy(prompts, training=True):
        seen.append((len(prompts), training))
        out = real(prompts, training=training)
        assert all(t.shape[0] == 1 for t in out[0])
        return out

    monkeypatch.setattr(agent, "get_action", spy)
    torch.manual_seed(0)
    agent.test(env)
    assert seen == [(2, False), (2, False), (1, False)]


def test_fitness_on_the_validation_split_never_reads_test_answers():
    calls = []
    env = _env(calls)
    valid = [{"question": f"v{i}", "answer": f"valid{i}"} for i in range(3)]
    env = ReasoningGym(env._data["train"]["rows"], env._data["test"]["rows"], make_tokenizer(), env.rubric,
                       TEMPLATE, data_batch_size_per_gpu=2, validation_dataset=valid)  # fmt: skip
    agent = make_agent(max_output_tokens=5)
    fitness = agent.test(env, split="validation")
    assert sorted(a for a, _ in calls) == ["valid0", "valid1", "valid2"]
    assert agent.last_eval["problems"] == 3.0 and fitness == agent.last_eval["reward/total"]
    with pytest.raises(ValueError, match="eval_mode serves a held-out split"):
        agent.test(env, split="train")
    with pytest.raises(ValueError, match="needs a validation_dataset"):
        agent.test(_env([]), split="validation")
