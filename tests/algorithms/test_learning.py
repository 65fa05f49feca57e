"""GRPO measurably improves an SFT-warmed model on held-out problems (CPU, ~1 minute).

The embedded tiny model (~0.16M parameters) is warmed up for a short SFT run on Countdown
oracle solutions: after 80 steps it has seen the answer format but its samples rarely follow it
whole. Then one LoRA GRPO agent trains on the task's own rewards for 30 steps (8 prompts x 8),
and the held-out mean reward (8 samples at T=1 on each of the same 32 fixed test problems, which
never appear in training) must rise by a fixed margin; the greedy answers must then have the
format. Everything is seeded and runs on one thread.

Observed on the 2-core development machine (seed 0): held-out mean sampled reward 0.129 before
GRPO, 0.586 after (the format part; exact accuracy stays ~0: the equation part needs far more
SFT, see ``benchmarks/learning.py``).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_gym.algorithms.grpo.agent import GRPO
from llm_gym.algorithms.rollout.rollout import evaluate
from llm_gym.algorithms.sft import SFTConfig, oracle_examples, train_sft
from llm_gym.reasoning_gym import ReasoningGym
from llm_gym.registry import get_task
from llm_gym.tiny import tiny_model_path

TASK = "llm_gym/Countdown-v0"
KNOBS = {"min_numbers": 3, "max_numbers": 3, "max_number": 9, "max_target": 30}
MARGIN = 0.25
"""Required rise of the held-out mean sampled reward (of a maximum 2.0); observed rise 0.457."""


@pytest.fixture
def one_thread():
    """Run on one torch thread (fastest for the tiny model on a shared 2-core box); restore after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _held_out_reward(agent: GRPO, env: ReasoningGym) -> float:
    """Mean total reward of ``group_size`` sampled completions (T=1) per held-out problem.

    Sampling, not greedy: the greedy output of the tiny model is nearly the same string for
    every problem, so its format reward flips between 0 and 1 for all problems at once; the
    sampled mean measures the policy's expected reward and moves smoothly.
    """
    return evaluate(agent, env, greedy=False)["reward/total"]


@pytest.mark.usefixtures("one_thread")
def test_grpo_raises_held_out_reward_of_sft_model():
    torch.manual_seed(0)
    source = str(tiny_model_path("tiny", seed=0))
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    examples = oracle_examples(get_task(TASK), tokenizer, size=2000, seed=1, **KNOBS)
    train_sft(model, tokenizer, examples, SFTConfig(max_steps=80, lr=3e-3, batch_size=32, warmup_steps=20, seed=0))

    env = ReasoningGym.from_task(TASK, tokenizer, train_size=500, test_size=32, seed=0, data_batch_size_per_gpu=8,
                                 **KNOBS)  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM", lora_dropout=0.0)
    agent = GRPO(model, pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, lora_config=lora,
                 batch_size=64, group_size=8, max_output_tokens=40, lr=1e-3, beta=0.0, temperature=1.0, seed=0,
                 device="cpu")  # fmt: skip

    before = _held_out_reward(agent, env)
    prompts = env.reset(reset_dataloaders=True)
    for _ in range(30):
        completion_ids, action_masks = agent.get_action(prompts)
        prompts, rewards = env.step(completion_ids)
        agent.learn((completion_ids, action_masks, rewards))
    after = _held_out_reward(agent, env)

    greedy_after = agent.test(env)

    assert env.num_problems("test") == 32
    assert before < 0.3, f"the SFT model should leave room to learn; held-out reward {before:.3f}"
    assert greedy_after >= 0.9, f"greedy held-out reward after GRPO {greedy_after:.3f}: the format is not learnt"
    assert after - before >= MARGIN, f"GRPO moved held-out mean reward {before:.3f} -> {after:.3f}"


def test_main_job_mutates_beta_only_when_it_starts_positive():
    from llm_gym.algorithms.recipe import TrainConfig, mutation_genes

    assert "beta" not in set(mutation_genes(0.0))
    assert set(mutation_genes(0.04)) == {"lr", "clip_coef", "temperature", "group_size", "beta"}
    assert mutation_genes(0.0)["lr"].max == 3e-3
    assert TrainConfig().threads == 1


def _says_yes(completion: str, *, answer: str, prefill: str = "", **_: object) -> float:
    """1.0 when the answer tag holds exactly the expected answer."""
    import re

    found = re.fullmatch(r"<answer>(\w+)</answer>", (prefill + completion).strip())
    return 1.0 if found and found.group(1) == answer else 0.0


@pytest.mark.usefixtures("one_thread")
def test_grpo_raises_held_out_exact_accuracy_from_the_verifier_alone():
    """An imperfect teacher's bias is unlearnt from rewards, on problems GRPO never trained on (~15 s).

    The SFT data answers "yes" for 30 % of the questions and "no" for 70 %, though the verifier
    accepts only "yes": after a short SFT the greedy answer on held-out questions is "no"
    (exact accuracy ~0), while sampled groups of 8 hold a "yes" ~94 % of the time, so GRPO has a
    signal. 30 GRPO steps on the training questions must lift greedy exact accuracy on the held-out
    questions (by hash, never trained on) to >= 0.9. What is learnt does not depend on the
    question, which is why it transfers; the arithmetic tasks' much smaller held-out gains are
    measured in ``benchmarks/learning.py``. Observed (seed 0): 0.0 -> 1.0 (1.0 from step 20 on).
    """
    import random

    from llm_gym.algorithms.sft import SFTExample
    from llm_gym.problems import split_of
    from llm_gym.rubric import Rubric

    torch.manual_seed(0)
    rng = random.Random(0)
    words = sorted({"".join(rng.choice("0123456789") for _ in range(4)) for _ in range(3000)})
    rows = [{"question": w, "answer": "yes"} for w in words]
    test = [r for r in rows if split_of(r["question"], 0.2) == "test"][:64]
    train = [r for r in rows if split_of(r["question"], 0.2) == "train"]
    source = str(tiny_model_path("tiny", seed=0))
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    template = [{"role": "user", "content": "Is {question} a number?"}, {"role": "assistant", "content": "<answer>"}]
    env = ReasoningGym(train, test, tokenizer, Rubric([_says_yes], [1.0], names=["correct"]), template,
                       data_batch_size_per_gpu=8, seed=0, correct_part="correct")  # fmt: skip
    teacher = [SFTExample(env.template.render_text(r, tokenizer), f"{'yes' if rng.random() < 0.3 else 'no'}</answer>")
               for r in train]  # fmt: skip
    train_sft(model, tokenizer, teacher, SFTConfig(max_steps=60, lr=3e-3, batch_size=32, warmup_steps=20, seed=0))
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM", lora_dropout=0.0)
    agent = GRPO(model, pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, lora_config=lora,
                 batch_size=64, group_size=8, max_output_tokens=12, lr=1e-3, beta=0.0, temperature=1.0, seed=0,
                 device="cpu")  # fmt: skip

    before = evaluate(agent, env)
    prompts = env.reset(reset_dataloaders=True)
    for _ in range(30):
        completion_ids, action_masks = agent.get_action(prompts)
        prompts, rewards = env.step(completion_ids)
        agent.learn((completion_ids, action_masks, rewards))
    after = evaluate(agent, env)

    assert before["problems"] == after["problems"] == 64
    assert before["accuracy"] <= 0.2, f"the SFT start should answer mostly wrongly; exact {before['accuracy']:.3f}"
    assert after["accuracy"] >= 0.9, f"held-out exact accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}"
