"""A small Qwen2-style model and byte-level BPE tokenizer, built locally with no network.

The library's embedded default: a model small enough that supervised warm-up and GRPO run on
a laptop CPU in minutes. Everything is built from scratch here (random weights, a BPE trained
on the built-in tasks' own prompts and oracle answers) and cached on disk, so that
``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` load
it like any hub model::

    from llm_gym.tiny import tiny_model_path
    MODEL_PATH = tiny_model_path("tiny")      # built on first call, cached afterwards

Why the tokenizer is a :class:`~transformers.Qwen2Tokenizer`: transformers 5.x rebuilds the
tokenizer class named in ``tokenizer_config.json`` and, for Qwen2, replaces the pre-tokenizer
with its own. The BPE is therefore trained with Qwen2's exact normalizer and pre-tokenizer
(NFC, Split on Qwen2's regex, ByteLevel without regex), so the saved tokenizer reloads
identically. Qwen2's regex splits numbers into single digits, which suits arithmetic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, Qwen2ForCausalLM, Qwen2Tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_CORPUS_TASKS",
    "PAD_TOKEN",
    "PRESETS",
    "SPECIAL_TOKENS",
    "TURN_END",
    "TURN_START",
    "TinyConfig",
    "build_model",
    "build_tokenizer",
    "default_corpus",
    "load_tiny",
    "tiny_model_path",
]

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, TURN_START, TURN_END)
"""Special tokens, in id order (0, 1, 2). ``<|im_end|>`` is the end-of-sequence token."""

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2-style ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, no default system
prompt. ``continue_final_message=True`` (handled by transformers) cuts the text after the last
message's content, so an assistant prefill is continued."""

DEFAULT_CORPUS_TASKS = ("llm_gym/Countdown-v0", "llm_gym/Subtraction-v0")
"""The tasks whose text trains the default tokenizer (the two tasks that existed when it was fixed)."""

_BUILD_VERSION = 2  # bump when the build or default_corpus changes: invalidates cached tiny models
_COVERAGE_TEXT = (
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] , . : ; ! ? < > ' \" "
    "<think> </think> <answer> </answer> \n\n"
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


@dataclass(frozen=True)
class TinyConfig:
    """Shape of a tiny Qwen2 model and its tokenizer.

    Parameters without the (tied) embedding: ``"tiny"`` 123,456, ``"mini"`` 985,216,
    ``"small"`` 33,575,424; the embedding adds ``len(tokenizer) * hidden_size`` (32,768 for
    ``"tiny"`` at 512 tokens).
    """

    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 2
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention heads; must divide ``hidden_size``."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide ``num_heads``."""
    intermediate_size: int = 256
    """Width of the SwiGLU feed-forward layer."""
    max_position: int = 1024
    """Longest sequence (prompt + completion) the model is configured for."""
    vocab_size: int = 512
    """Target BPE vocabulary size, special tokens included (the trained one may be smaller)."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output head (halves the embedding parameters)."""
    rope_theta: float = 10_000.0
    """Rotary embedding base."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "tie_word_embeddings" and not value > 0:
                raise ValueError(f"TinyConfig.{field.name}={value!r} must be positive")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"TinyConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "choose num_heads among the divisors of hidden_size"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TinyConfig.num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}; "
                "choose num_kv_heads among the divisors of num_heads"
            )
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"TinyConfig.vocab_size={self.vocab_size} is below {256 + len(SPECIAL_TOKENS)}: a byte-level BPE "
                "needs the 256 bytes plus the special tokens; use at least 259"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads


PRESETS: MappingProxyType[str, TinyConfig] = MappingProxyType(
    {
        # 0.12M parameters + embedding: a GRPO step in ~0.1 s on 2 CPU cores.
        "tiny": TinyConfig(),
        # Wider and deeper: 1.0M parameters + embedding.
        "mini": TinyConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512),
        # 33.6M parameters + embedding: benchmarks and GPU runs.
        "small": TinyConfig(
            hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=2048, max_position=2048
        ),
    }
)
"""Named model shapes for :func:`tiny_model_path` and :func:`load_tiny`."""


def _resolve_config(config: TinyConfig | str) -> TinyConfig:
    if isinstance(config, TinyConfig):
        return config
    if config not in PRESETS:
        raise ValueError(f"unknown tiny model preset {config!r}; presets: {', '.join(PRESETS)}, or pass a TinyConfig")
    return PRESETS[config]


def _chatml(messages: Iterable[dict[str, str]]) -> str:
    # Same text the chat template renders, without needing a tokenizer yet.
    return "".join(f"{TURN_START}{m['role']}\n{m['content']}{TURN_END}\n" for m in messages)


def default_corpus(
    problems_per_task: int = 200, seed: int = 0, env_ids: Iterable[str] | None = None
) -> list[str]:
    """Training text for the tokenizer: tasks' prompts and oracle answers.

    Each generated task contributes ``problems_per_task`` training problems, rendered as the
    full conversation (prompt, prefill, oracle completion, end of turn). A custom env (a
    multi-turn game) contributes ``problems_per_task`` whole oracle episodes when its class offers
    ``example_conversations(count, seed)``. A fixed coverage line adds digits, operators, tags and
    letters.

    Args:
        problems_per_task: Problems (or episodes) drawn from each env's train split.
        seed: Seed of the drawn problems.
        env_ids: The tasks; default :data:`DEFAULT_CORPUS_TASKS`. The default is a fixed list, not
            every registered task, so that adding a task leaves the cached tiny model (and the
            demo's numbers) unchanged. For a tiny model that tokenizes another task well, pass
            ``tiny_model_path(corpus=default_corpus(env_ids=["llm_gym/Zebra-v0"]))``.

    Returns:
        The corpus, one text per problem or episode (plus the coverage line).
    """
    import gymnasium as gym
    from gymnasium.envs.registration import load_env_creator

    import llm_gym.tasks  # noqa: F401  (registers the built-in tasks)
    from llm_gym.env import build_problems
    from llm_gym.registry import get_task, list_task_envs

    texts = [_COVERAGE_TEXT]
    task_envs = set(list_task_envs())
    for env_id in DEFAULT_CORPUS_TASKS if env_ids is None else env_ids:
        if env_id not in task_envs:  # a custom env (a multi-turn game): whole oracle episodes
            examples = getattr(load_env_creator(gym.spec(env_id).entry_point), "example_conversations", None)
            if examples is not None:
                texts.extend(_chatml(conversation) for conversation in examples(problems_per_task, seed))
            continue
        task = get_task(env_id)
        if task.generate is None:
            continue
        problems = build_problems(task, split="train", size=problems_per_task, seed=seed)
        for problem in problems:
            messages = task.template.render(problem)
            answer = task.solve(problem) if task.solve is not None else None
            if answer is not None and messages[-1]["role"] == "assistant":
                messages[-1] = {"role": "assistant", "content": messages[-1]["content"] + answer}
            elif answer is not None:
                messages.append({"role": "assistant", "content": answer})
            texts.append(_chatml(messages))
    return texts


def build_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 512, model_max_length: int = 1024
) -> Qwen2Tokenizer:
    """Train a byte-level BPE with Qwen2's pre-tokenizer and wrap it as a Qwen2 tokenizer.

    Args:
        corpus: Training texts; default :func:`default_corpus` (Countdown's and Subtraction's text).
        vocab_size: Target vocabulary size including the 3 special tokens; at least 259
            (256 bytes + specials). The result is smaller when the corpus has fewer merges.
        model_max_length: Longest sequence the model takes (saved with the tokenizer).

    Returns:
        A tokenizer with ``<|endoftext|>`` (pad, id 0), ``<|im_start|>`` (id 1), ``<|im_end|>``
        (eos, id 2), a ChatML chat template, and left padding (batched generation).

    Raises:
        ValueError: if ``vocab_size`` is below 259.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must be at least 259 (256 bytes + 3 special tokens)")
    texts = default_corpus() if corpus is None else corpus
    # The pipeline Qwen2Tokenizer builds on load; training with it keeps the saved merges valid.
    bpe = Tokenizer(BPE(unk_token=None))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_strings(texts), trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        unk_token=None,
        eos_token=TURN_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[TURN_START],
        padding_side="left",  # batched generation pads on the left
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    logger.info("trained a byte-level BPE of %d tokens", len(tokenizer))
    return tokenizer


def _strings(texts: Iterable[str]) -> Iterator[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"corpus item {i} is a {type(text).__name__}, not a str; pass an iterable of strings")
        yield text


def build_model(tokenizer: Any, config: TinyConfig | str = "tiny", seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM sized by ``config`` for ``tokenizer``.

    Args:
        tokenizer: The tokenizer; the embedding has ``len(tokenizer)`` rows and the eos/pad ids
            go into the model and generation configs (generation stops at ``<|im_end|>``).
        config: A :class:`TinyConfig` or a preset name from :data:`PRESETS`.
        seed: Seed of the weight initialisation.

    Returns:
        The model in float32, in train mode.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    cfg = _resolve_config(config)
    eos_id = tokenizer.convert_tokens_to_ids(TURN_END) if tokenizer.eos_token is None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token is not None else eos_id
    hf_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    # Seed a private generator state: initialisation must not depend on (or disturb) global RNG use.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(hf_config)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)
    return model


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("LLM_GYM_CACHE"):
        return Path(os.environ["LLM_GYM_CACHE"])
    return Path.home() / ".cache" / "llm_gym"


def _fingerprint(cfg: TinyConfig, seed: int, corpus: list[str]) -> str:
    digest = hashlib.sha256()
    header = {"config": dataclasses.asdict(cfg), "seed": seed, "build_version": _BUILD_VERSION}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for text in corpus:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()[:12]


def tiny_model_path(
    preset: TinyConfig | str = "tiny",
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    env_ids: Iterable[str] | None = None,
) -> Path:
    """The folder of a tiny model and its tokenizer, built on first use and cached.

    The folder name holds a hash of the config, the seed and the tokenizer corpus, so a change
    to any of them (for example a task's prompt) builds a new model. The build writes into a
    temporary folder and renames it into place, so concurrent builders never leave a partial
    folder: the first rename wins and the others reuse its result.

    Args:
        preset: A preset name from :data:`PRESETS` or a :class:`TinyConfig`.
        cache_dir: Where cached models live; default ``$LLM_GYM_CACHE`` or ``~/.cache/llm_gym``.
        seed: Seed of the weight initialisation.
        corpus: Tokenizer training texts; default :func:`default_corpus` of ``env_ids``.
        env_ids: The envs whose text trains the tokenizer when no ``corpus`` is given; default
            :data:`DEFAULT_CORPUS_TASKS` (e.g. ``["llm_gym/TicTacToe-v0"]`` for a model that plays
            the game: its conversations are ~40 % shorter with a tokenizer that has seen them).

    Returns:
        A folder that ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained`` load.
    """
    cfg = _resolve_config(preset)
    texts = default_corpus(env_ids=env_ids) if corpus is None else list(_strings(corpus))
    name = preset if isinstance(preset, str) else "custom"
    root = _cache_root(cache_dir)
    final = root / f"tiny-{name}-{_fingerprint(cfg, seed, texts)}"
    if (final / "config.json").exists():
        logger.debug("reusing cached tiny model %s", final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        tokenizer = build_tokenizer(texts, vocab_size=cfg.vocab_size, model_max_length=cfg.max_position)
        model = build_model(tokenizer, cfg, seed=seed)
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another builder renamed first: keep its folder
            if not (final / "config.json").exists():
                raise
            logger.debug("another process built %s first", final)
        else:
            n_params = sum(p.numel() for p in model.parameters())
            logger.info("built tiny model %s (%d parameters, vocab %d)", final, n_params, len(tokenizer))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_tiny(
    preset: TinyConfig | str = "tiny",
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, Any]:
    """Load (building on first use) a cached tiny model and its tokenizer.

    Args:
        preset: A preset name from :data:`PRESETS` or a :class:`TinyConfig`.
        cache_dir: See :func:`tiny_model_path`.
        seed: Seed of the weight initialisation.

    Returns:
        ``(model, tokenizer)`` loaded with the ``Auto*`` classes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_path(preset, cache_dir=cache_dir, seed=seed)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
