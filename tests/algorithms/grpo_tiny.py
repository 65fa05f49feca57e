"""Tiny offline model, tokenizer and agent factories for the GRPO tests (imported as `grpo_tiny`)."""

from __future__ import annotations

import string

import torch
from peft import LoraConfig
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from llm_gym.algorithms.grpo.agent import GRPO

EOS = 0  # id of <|endoftext|>, also the padding id (as seed 001 does)
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHARS = [c for c in string.printable if c not in "\x0b\x0c\r"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: 3 special tokens + 97 printable characters (vocabulary 100)."""
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + _CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.add_special_tokens(_SPECIALS)
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=_SPECIALS[0], pad_token=_SPECIALS[0])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(seed: int = 0, vocab: int = 100, init_std: float = 0.02) -> Qwen2ForCausalLM:
    """A randomly initialised 2-layer Qwen2 (~22k parameters), identical for identical seeds."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=vocab, max_position_embeddings=512, eos_token_id=EOS,
        bos_token_id=EOS, pad_token_id=EOS, tie_word_embeddings=True, initializer_range=init_std,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def lora_config(r: int = 4) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def make_agent(model=None, **kwargs) -> GRPO:
    """A GRPO agent on the tiny model (CPU, fp32), small budgets; kwargs override."""
    options = dict(
        pad_token_id=EOS, pad_token="<|endoftext|>", lora_config=lora_config(), batch_size=64,
        group_size=4, max_output_tokens=6, lr=1e-2, device="cpu", seed=0,
    )  # fmt: skip
    options.update(kwargs)
    return GRPO(model if model is not None else make_model(), **options)


def prompt(ids: list[int]) -> dict:
    t = torch.tensor([ids], dtype=torch.long)
    return {"input_ids": t, "attention_mask": torch.ones_like(t), "text": None}



def single_thread():
    """Generator body for an autouse fixture: tiny matmuls run fastest on one thread.

    With several processes sharing 2 cores, torch's intra-op thread pool spends ~15 ms per tiny
    matmul synchronising (measured); one thread makes them take microseconds.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
