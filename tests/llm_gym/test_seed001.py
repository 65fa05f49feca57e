"""Seed 001's data preparation, template and reward functions, run unchanged against ReasoningGym.

The three reward functions are the tutorial's own (``tests/seed001.py``, shared/seeds/001), kept as written,
including its ``eval`` of a regex-checked equation: they are the user code that must keep working,
not library code. They call ``numbers.flatten()`` on the question column and prepend ``<think>``
to the completion themselves.
"""

from __future__ import annotations

import re

import datasets
import numpy as np
import pytest
import torch

from llm_gym.reasoning_gym import ReasoningGym
from tests.seed001 import seed_functions

SEED = seed_functions()  # the tutorial's own definitions, executed with llm-gym imports
format_reward_func = SEED["format_reward_func"]
equation_reward_func = SEED["equation_reward_func"]
combined_rewards = SEED["combined_rewards"]


CONVERSATION_TEMPLATE = [
    {
        "role": "system",
        "content": "You are a helpful assistant. You first think about the reasoning process in your mind and then "
        "provide the user with the answer.",
    },
    {
        "role": "user",
        "content": "Using each number in this list only once {question}, create an equation that equals {answer}. "
        "You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. Show your "
        "work in <think> </think> tags. And return the final equation and answer in <answer> </answer> tags, for "
        "example <answer>(1 + 2) / 3</answer>.",
    },
    {"role": "assistant", "content": "Let me solve this step by step.\n<think>"},
]


def make_dataset():
    """The seed's make_dataset on a local stand-in for Countdown-Tasks-3to4 (nums a, a+1, a+2)."""
    raw = datasets.Dataset.from_list([{"nums": [a, a + 1, a + 2], "target": 3 * a + 3} for a in range(1, 51)])
    raw = raw.shuffle(seed=42).select(range(50))
    raw = raw.rename_column("target", "answer")
    raw = raw.rename_column("nums", "question")
    split = raw.train_test_split(test_size=0.2, seed=0)
    return split["train"], split["test"]


def shown(prompt_text: str) -> tuple[list[int], int]:
    found = re.search(r"only once \[(\d+), (\d+), (\d+)\], create an equation that equals (\d+)\.", prompt_text)
    *nums, target = (int(g) for g in found.groups())
    return nums, target


@pytest.fixture
def seed_env(tokenizer, monkeypatch, tmp_path):
    from accelerate import Accelerator

    monkeypatch.chdir(tmp_path)  # combined_rewards appends to ./countdown_completions.txt
    train_dataset, test_dataset = make_dataset()
    return ReasoningGym(
        train_dataset=train_dataset,
        test_dataset=test_dataset,
        tokenizer=tokenizer,
        reward_fn=combined_rewards,
        conversation_template=CONVERSATION_TEMPLATE,
        data_batch_size_per_gpu=10,
        accelerator=Accelerator(cpu=True),
        return_raw_completions=True,
        max_context_length=1024,
    )


def test_seed_rewards_score_text_completions(seed_env, tmp_path):
    assert (len(seed_env), seed_env.num_problems("test")) == (40, 10)
    prompts = seed_env.reset()
    assert len(prompts) == 10
    groups = []
    for prompt in prompts:
        (a, b, c), target = shown(prompt["text"])
        assert a + b + c == target
        groups.append([
            f" {a}+{b}+{c}={target} </think>\n<answer>{a} + {b} + {c}</answer>",  # format and equation: 2
            f" sure </think>\n<answer>{a} * {b} * {c}</answer>",  # format only: 1
            f"<answer>{a} + {b} + {c}</answer>",  # equation only (no </think>): 1
            "no idea",  # 0
        ])
    _, rewards = seed_env.step(groups)
    assert rewards.tolist() == [[2.0, 1.0, 1.0, 0.0]] * 10
    log = (tmp_path / "countdown_completions.txt").read_text()
    (a, b, c), _ = shown(prompts[0]["text"])
    assert f"Prompt {np.array([a, b, c])}\n" in log  # the question reached the seed as a numpy array
    assert log.count("=" * 50) == 10


def test_seed_rewards_score_token_id_completions(seed_env, tokenizer):
    prompts = seed_env.reset()
    batch = []
    for prompt in prompts:
        (a, b, c), target = shown(prompt["text"])
        text = f" ok </think>\n<answer>{c} + {b} + {a}</answer>"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        batch.append(torch.cat([prompt["input_ids"], torch.tensor([ids])], dim=1))  # [1, L + C]
    _, rewards = seed_env.step(batch)
    assert rewards.tolist() == [[2.0]] * 10


def test_seed_eval_loop_uses_test_answers_only_inside_eval_mode(seed_env):
    train_prompts = seed_env.reset()
    with seed_env.eval_mode():
        prompts = seed_env.reset(reset_dataloaders=True)
        assert seed_env.num_batches() == 1
        test_nums = [shown(p["text"]) for p in prompts]
        _, rewards = seed_env.step([[f" x </think>\n<answer>{a} + {b} + {c}</answer>"] for (a, b, c), _ in test_nums])
        assert rewards.tolist() == [[2.0]] * 10
    answers = [[f" x </think>\n<answer>{a} + {b} + {c}</answer>" for (a, b, c), _ in test_nums]]
    # the test equations given to the training batch are scored against the training problems: format only
    _, rewards = seed_env.step(answers * len(train_prompts))
    assert rewards.tolist() == [[1.0] * 10] * 10
