"""Fixtures for the core tests: a tokenizer with a Qwen2-style chat template, built offline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# pytest puts tests/ on sys.path (for tests/conftest.py), where the folder tests/llm_gym would be
# imported as a namespace package named llm_gym, shadowing the real one (the editable install's
# finder comes after the path finder). The repository root first makes the real package win.
# The lasting fix is `pythonpath = ["."]` under [tool.pytest.ini_options].
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Qwen2's chat template (default system message included), written out here so nothing is
# downloaded. It supports ``add_generation_prompt``; ``continue_final_message`` is handled by
# transformers, which cuts the rendered text after the final message.
QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = [
    "Using each number in this list only once, create an equation that equals the target.",
    "You are a helpful assistant. You first think about the reasoning process in your mind.",
    "Let me solve this step by step.\n<think> 44 + 19 = 63, 63 - 35 = 28 </think>\n<answer>44 + 19 - 35</answer>",
    "What is 71 - 28? Show your work in <think> </think> tags and the result in <answer> </answer> tags.",
    "0123456789 + - * / ( ) = [ ] , . ? ! system user assistant echo the number",
]


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer (vocab ~400) with Qwen2's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = QWEN2_CHAT_TEMPLATE
    return tok


# ------------------------------------------------------------------------------------------ toy task
# "Double the number": small enough to check every reward by hand. Module-level functions so the
# task deep-copies and pickles like a real one.
DOUBLE_ENV_ID = "llm_gym_test/Double-v0"


def double_format(completion: str, *, prefill: str = "", **_: object) -> float:
    """1.0 when the whole assistant turn is ``<answer>digits</answer>``."""
    import re

    return 1.0 if re.fullmatch(r"<answer>\d+</answer>", prefill + completion) else 0.0


def double_correct(completion: str, *, target: int, prefill: str = "", **_: object) -> float:
    """1.0 when the number in the answer tag is the target."""
    import re

    found = re.search(r"<answer>(\d+)</answer>", prefill + completion)
    return 1.0 if found and int(found.group(1)) == int(target) else 0.0


def make_double_task():
    """The toy task: ``n`` in [0, high), answer ``2n``; template with a prefill, 2-part rubric."""
    import dataclasses

    from llm_gym.rubric import Rubric
    from llm_gym.task import Task
    from llm_gym.template import ConversationTemplate

    @dataclasses.dataclass(frozen=True)
    class DoubleConfig:
        high: int = 1000

    def generate(rng, config):
        n = int(rng.integers(0, config.high))
        return {"n": n, "target": 2 * n}

    return Task(
        name="Double",
        version=0,
        columns=("n", "target"),
        question_column="n",
        answer_column="target",
        template=ConversationTemplate([
            {"role": "system", "content": "Reply with twice the number."},
            {"role": "user", "content": "Double {question}."},
            {"role": "assistant", "content": "<answer>"},
        ]),
        rubric=Rubric([double_format, double_correct], [0.5, 1.0], names=["format", "correct"], timeout=2.0),
        correct_part="correct",
        config=DoubleConfig(),
        generate=generate,
        solve=lambda p: f"{p['target']}</answer>",
        description="Double a number (test task).",
    )


@pytest.fixture(scope="session")
def double_task():
    """The toy task, also registered as ``llm_gym_test/Double-v0``."""
    import gymnasium as gym

    task = make_double_task()
    if DOUBLE_ENV_ID not in gym.registry:
        gym.register(id=DOUBLE_ENV_ID, entry_point="llm_gym.env:ReasoningEnv", kwargs={"task": task})
    return task
