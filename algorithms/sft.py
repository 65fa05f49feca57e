"""Supervised fine-tuning warm-up: teach a model a task's answer format before GRPO.

The pipeline of the warm-up (seed 000): build prompt/completion pairs, either from a task's
oracle or from any model's rollouts filtered by reward; check how many fit a sequence length;
train on the completion tokens only.

    examples = oracle_examples(task, tokenizer, size=2000)
    length_report(examples, tokenizer, seq_len=256)      # logs "100.00% of examples fit ..."
    result = train_sft(model, tokenizer, examples, SFTConfig(max_steps=300, lr=3e-3))

Prompt and completion are tokenized separately and concatenated, exactly as at generation
time (the prompt is tokenized alone and the model continues it), so no BPE merge across the
boundary makes training text differ from what the model later sees. The end-of-turn token
(``tokenizer.eos_token``) is appended to every completion so the model learns to stop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llm_gym.algorithms.plumbing.cpu_allocator import retain_freed_memory
from llm_gym.algorithms.rollout.decoding import accepts_logits_to_keep
from llm_gym.algorithms.sft_loss import IGNORE_INDEX, completion_loss, labelled_loss
from llm_gym.env import build_problems
from llm_gym.task import Task
from llm_gym.template import ConversationTemplate

__all__ = [
    "BandStop",
    "IGNORE_INDEX",
    "LengthReport",
    "SFTConfig",
    "SFTExample",
    "SFTResult",
    "collate",
    "completion_loss",
    "dataset_examples",
    "collate_rows",
    "example_row",
    "filter_rollouts",
    "labelled_loss",
    "length_report",
    "oracle_examples",
    "tokenize_example",
    "train_sft",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTExample:
    """One training pair: the prompt text (chat template applied) and the completion after it."""

    prompt: str
    completion: str


def oracle_examples(
    task: Task,
    tokenizer: Any,
    *,
    size: int = 1000,
    seed: int = 0,
    split: str = "train",
    template: ConversationTemplate | Sequence[Mapping[str, str]] | None = None,
    solver: Callable[[Mapping[str, Any]], str | None] | None = None,
    **knobs: Any,
) -> list[SFTExample]:
    """Prompt/completion pairs from a task's oracle solutions (or from another teacher's).

    Args:
        task: A task with an oracle (``task.solve``).
        tokenizer: A tokenizer with a chat template; renders the prompts.
        size: Number of problems drawn (problems the oracle cannot solve are skipped).
        seed: Seed of the drawn problems.
        split: The split drawn from; the warm-up must use ``"train"`` so held-out accuracy stays honest.
        template: Conversation template; default the task's. The oracle writes its completion to
            follow the default template's prefill.
        solver: The teacher, called like ``task.solve`` (problem -> completion or None); default
            the task's oracle. E.g. :class:`llm_gym.tasks.countdown_teacher.WeakTeacher`, a
            stand-in for distilled data from a weaker model.
        **knobs: Generator knobs of the task (difficulty), e.g. ``max_numbers=3``.

    Returns:
        The examples, in problem order.

    Raises:
        ValueError: if the task has no oracle.
    """
    solver = task.solve if solver is None else solver
    if solver is None:
        raise ValueError(
            f"{task.env_id} has no oracle (task.solve is None): build examples from scored rollouts "
            "with filter_rollouts instead"
        )
    conv = task.template if template is None else ConversationTemplate(template)
    problems = build_problems(task, split=split, size=size, seed=seed, **knobs)
    examples, unsolved = [], 0
    for problem in problems:
        answer = solver(problem)
        if answer is None:
            unsolved += 1
            continue
        examples.append(SFTExample(conv.render_text(problem, tokenizer), answer))
    if unsolved:
        logger.warning("%d of %d %s problems have no oracle solution and were skipped", unsolved, size, task.env_id)
    return examples


def dataset_examples(data: Iterable[Mapping[str, Any]], tokenizer: Any) -> list[SFTExample]:
    """Prompt/completion pairs from rows of chat messages (a dataset of ``llm-gym eval --save-dataset``).

    Each row has ``prompt`` (role/content messages) and ``completion`` (the assistant's message(s)).
    The prompt is rendered as at generation time: a final assistant message (the template's
    prefill) is continued, otherwise the assistant's generation prompt is added; the completion
    is the assistant's text after it. A multi-turn row (a completion of several messages) gives one
    example per assistant turn (:func:`llm_gym.episodes.turn_examples`). Filter the rows first (``llm-gym data filter``) to keep
    the good rollouts only.

    Args:
        data: The rows (a ``datasets.Dataset`` or dicts).
        tokenizer: A tokenizer with a chat template.

    Returns:
        One example per row.

    Raises:
        ValueError: a row lacks ``prompt`` or ``completion`` message lists.
    """
    examples = []
    for k, row in enumerate(data):
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, list) or not isinstance(completion, list) or not completion:
            raise ValueError(f"row {k} needs 'prompt' and 'completion' message lists (llm-gym eval --save-dataset "
                             f"writes them); it has columns {sorted(row)}")  # fmt: skip
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        if len(completion) > 1:  # a multi-turn episode: one example per assistant turn
            from llm_gym.episodes import turn_examples

            turns = [{"role": m["role"], "content": m["content"]} for m in completion]
            examples += [SFTExample(p, c) for p, c in turn_examples(messages + turns, tokenizer)]
            continue
        prefill = bool(messages) and messages[-1]["role"] == "assistant"
        text = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=prefill,
                                             add_generation_prompt=not prefill)  # fmt: skip
        examples.append(SFTExample(text, "".join(m["content"] for m in completion)))
    return examples


def filter_rollouts(
    prompts: Sequence[str],
    completions: Sequence[str],
    rewards: Sequence[float | Mapping[str, float]],
    threshold: float | Mapping[str, float],
) -> list[SFTExample]:
    """Keep the rollouts whose reward reaches a threshold (rejection sampling for SFT).

    Args:
        prompts: Prompt texts (chat template applied).
        completions: The generated completions.
        rewards: One reward per rollout: a number, or a mapping of reward part to value
            (e.g. a :class:`~llm_gym.rubric.Score`'s ``parts``).
        threshold: A number (the reward, or the sum of the parts, must be ``>=`` it) or a
            mapping of part to minimum (every named part must reach its minimum), e.g.
            ``{"format": 1.0, "equation": 1.0}``.

    Returns:
        The kept rollouts as examples.

    Raises:
        ValueError: if the three sequences differ in length or a named part is missing.
    """
    if not len(prompts) == len(completions) == len(rewards):
        raise ValueError(
            f"prompts, completions and rewards must have one entry per rollout; got lengths "
            f"{len(prompts)}, {len(completions)}, {len(rewards)}"
        )
    kept = []
    for prompt, completion, reward in zip(prompts, completions, rewards):
        if _passes(reward, threshold):
            kept.append(SFTExample(prompt, completion))
    logger.info("kept %d of %d rollouts at threshold %s", len(kept), len(prompts), threshold)
    return kept


def _passes(reward: float | Mapping[str, float], threshold: float | Mapping[str, float]) -> bool:
    if isinstance(threshold, Mapping):
        if not isinstance(reward, Mapping):
            raise ValueError(f"a per-part threshold {dict(threshold)} needs per-part rewards, got {reward!r}")
        missing = sorted(set(threshold) - set(reward))
        if missing:
            raise ValueError(f"threshold names part {missing[0]!r}, but the rewards have parts {sorted(reward)}")
        return all(reward[name] >= minimum for name, minimum in threshold.items())
    total = sum(reward.values()) if isinstance(reward, Mapping) else reward
    return float(total) >= threshold


@dataclass(frozen=True)
class LengthReport:
    """Token lengths (prompt + completion + end of turn) of a set of examples."""

    count: int
    """Number of examples."""
    max_length: int
    """Longest example, in tokens."""
    mean_length: float
    """Mean length, in tokens."""
    seq_len: int
    """The sequence length checked."""
    fit: int
    """Examples of at most ``seq_len`` tokens."""

    @property
    def fit_fraction(self) -> float:
        """Share of examples that fit ``seq_len`` untruncated."""
        return self.fit / self.count if self.count else 1.0


def tokenize_example(example: SFTExample, tokenizer: Any, *, add_eos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the completion (with the end-of-turn id appended).

    Args:
        example: The pair.
        tokenizer: Its tokenizer.
        add_eos: Append ``tokenizer.eos_token_id`` to the completion unless it already ends with it.

    Returns:
        ``(prompt_ids, completion_ids)``.
    """
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not completion_ids or completion_ids[-1] != eos):
        completion_ids = [*completion_ids, eos]
    return list(prompt_ids), list(completion_ids)


def example_row(example: Any, tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of one example: an :class:`SFTExample` (labels on the completion), or any
    example with ``tokenize(tokenizer) -> (ids, labels)`` such as a multi-turn
    :class:`~llm_gym.multi_turn.ConversationExample` (labels on every assistant turn)."""
    if hasattr(example, "tokenize"):
        ids, labels = example.tokenize(tokenizer)
        return list(ids), list(labels)
    prompt, completion = tokenize_example(example, tokenizer)
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def length_report(examples: Sequence[Any], tokenizer: Any, seq_len: int) -> LengthReport:
    """Measure how many examples fit ``seq_len`` tokens, and log it.

    Args:
        examples: The examples.
        tokenizer: Their tokenizer.
        seq_len: The training sequence length considered.

    Returns:
        The report; the log line reads like seed 000's "98.28% of conversations fit within 700 tokens".
    """
    lengths = [len(example_row(ex, tokenizer)[0]) for ex in examples]
    report = LengthReport(
        count=len(lengths),
        max_length=max(lengths, default=0),
        mean_length=float(np.mean(lengths)) if lengths else 0.0,
        seq_len=seq_len,
        fit=sum(n <= seq_len for n in lengths),
    )
    logger.info(
        "longest example: %d tokens (mean %.1f); %.2f%% of %d examples fit within %d tokens",
        report.max_length, report.mean_length, 100 * report.fit_fraction, report.count, seq_len,
    )
    return report


def collate(
    pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, seq_len: int
) -> tuple[dict[str, torch.Tensor], int]:
    """Right-padded batch whose labels are the completion ids and -100 elsewhere.

    Sequences longer than ``seq_len`` lose their tail.

    Args:
        pairs: ``(prompt_ids, completion_ids)`` per example.
        pad_id: Padding id.
        seq_len: Longest sequence kept.

    Returns:
        ``({"input_ids", "attention_mask", "labels"}, number of truncated sequences)``; tensors are ``[B, L]``
        with ``L`` the longest kept sequence.
    """
    return collate_rows([(p + c, [IGNORE_INDEX] * len(p) + c) for p, c in pairs], pad_id, seq_len)


def collate_rows(
    pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, seq_len: int
) -> tuple[dict[str, torch.Tensor], int]:
    """:func:`collate` of ``(ids, labels)`` rows (labels -100 where not trained), e.g. multi-turn examples."""
    rows, truncated = [], 0
    for ids, labels in pairs:
        if len(ids) > seq_len:
            truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, L]
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}, truncated


class BandStop:
    """A :func:`train_sft` callback that ends the warm-up once a held-out score reaches a band.

    Every ``every`` steps it calls ``score()`` (e.g. greedy exact accuracy on validation problems;
    the model is the one being trained, ``score`` must leave it in train mode) and stops when the
    score is ``>= low``: the start RL needs, neither unsolved nor already solved. A score above
    ``high`` at the first check past ``low`` is logged as an overshoot (check more often). The
    SFT step cap (``SFTConfig.max_steps``) still ends a warm-up that never reaches the band.

    Args:
        score: Returns the held-out score of the model now.
        low: Lower edge of the band (stop at or above it).
        high: Upper edge of the band (only checked for the overshoot warning).
        every: Steps between checks (>= 1).

    Raises:
        ValueError: unless ``0 <= low <= high`` and ``every >= 1``.
    """

    def __init__(self, score: Callable[[], float], low: float, high: float, every: int) -> None:
        if not 0.0 <= low <= high:
            raise ValueError(f"BandStop needs 0 <= low <= high, got low={low}, high={high}")
        if every < 1:
            raise ValueError(f"BandStop.every={every} must be >= 1")
        self.score, self.low, self.high, self.every = score, low, high, every
        self.history: list[tuple[int, float]] = []
        """``(steps done, score)`` of every check."""

    def __call__(self, step: int, loss: float) -> bool:
        """True (stop) when the check after optimizer step ``step`` (0-based) scores ``>= low``."""
        if (step + 1) % self.every:
            return False
        value = float(self.score())
        self.history.append((step + 1, value))
        logger.info("sft step %d: held-out score %.3f (band [%.2f, %.2f])", step + 1, value, self.low, self.high)
        if value > self.high:
            logger.warning("sft overshot the band: score %.3f > %.2f at step %d; check more often (every=%d)",
                           value, self.high, step + 1, self.every)  # fmt: skip
        return value >= self.low


_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}


@dataclass(frozen=True)
class SFTConfig:
    """Hyper-parameters of the warm-up."""

    lr: float = 1e-3
    """Peak learning rate of AdamW. Around 1e-3 to 3e-3 for a random-init tiny model, 1e-5 to
    1e-4 for a full fine-tune of a pretrained one, ~1e-4 to 1e-3 for LoRA."""
    batch_size: int = 16
    """Examples per optimizer step."""
    max_steps: int | None = None
    """Optimizer steps; ``None`` runs ``epochs`` passes over the data."""
    epochs: float = 1.0
    """Passes over the data when ``max_steps`` is ``None``."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to ``lr``."""
    schedule: str = "cosine"
    """Decay after warm-up: ``"cosine"`` or ``"linear"`` (to 0), or ``"constant"``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; ``None`` disables it."""
    seq_len: int = 512
    """Sequences are truncated to this many tokens (a warning counts them)."""
    seed: int = 0
    """Seed of the data order."""
    log_every: int = 10
    """Log the mean loss every this many steps."""
    progress: bool = False
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"SFTConfig.schedule={self.schedule!r} is unknown; choose one of {sorted(_SCHEDULES)}")
        for name in ("lr", "batch_size", "epochs", "seq_len", "log_every"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SFTConfig.{name}={getattr(self, name)!r} must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"SFTConfig.max_steps={self.max_steps} must be at least 1, or None to use epochs")
        if self.warmup_steps < 0:
            raise ValueError(f"SFTConfig.warmup_steps={self.warmup_steps} must be >= 0")

    def total_steps(self, num_examples: int) -> int:
        """Optimizer steps for a dataset of ``num_examples``."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * num_examples / self.batch_size))

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based) out of ``total``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, total - self.warmup_steps)
        return self.lr * _SCHEDULES[self.schedule](min(1.0, (step - self.warmup_steps) / span))


@dataclass
class SFTResult:
    """What a warm-up did."""

    losses: list[float] = field(default_factory=list)
    """Loss of every optimizer step."""
    steps: int = 0
    """Optimizer steps taken."""
    seconds: float = 0.0
    """Wall time of the training loop."""
    truncated: int = 0
    """Sequences cut to ``seq_len`` (counted once per use)."""
    tokens: int = 0
    """Completion tokens trained on."""
    stopped_early: bool = False
    """The callback ended the warm-up before its last step (e.g. :class:`BandStop`)."""


def _batches(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> Iterable[np.ndarray]:
    """Index batches over shuffled epochs; an epoch's tail batch is completed from the next epoch."""
    order = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:batch_size]
        order = order[batch_size:]


def train_sft(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    config: SFTConfig | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> SFTResult:
    """Fine-tune ``model`` on the completions of ``examples`` (prompt tokens are not scored).

    Trains every parameter that requires a gradient: all of a plain model (full fine-tune), only
    the adapters of a PEFT model.

    Args:
        model: A causal LM (Hugging Face or PEFT); it is left in eval mode.
        tokenizer: Its tokenizer; its eos id ends each completion and its pad id pads.
        examples: The training pairs (:class:`SFTExample`), or multi-turn examples with
            ``tokenize(tokenizer) -> (ids, labels)`` (:class:`~llm_gym.multi_turn.ConversationExample`).
        config: Hyper-parameters; default :class:`SFTConfig()`.
        callback: Called as ``callback(step, loss)`` after every optimizer step; a truthy return
            ends the warm-up there (``result.stopped_early``), e.g. :class:`BandStop`.

    Returns:
        The loss curve and counts.

    Raises:
        ValueError: on an empty dataset or a model with no trainable parameter.
    """
    config = SFTConfig() if config is None else config
    if not examples:
        raise ValueError("train_sft got no examples: build some with oracle_examples or filter_rollouts")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = [example_row(ex, tokenizer) for ex in examples]
    total = config.total_steps(len(pairs))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    device = next(model.parameters()).device
    if device.type == "cpu":
        retain_freed_memory()  # reuse activation memory between steps (see cpu_allocator)
    rng = np.random.default_rng(config.seed)
    result = SFTResult()
    logger.info("SFT: %d examples, %d steps of batch %d, lr %g", len(pairs), total, config.batch_size, config.lr)

    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="sft")
    model.train()
    head_window = accepts_logits_to_keep(model)
    start = time.perf_counter()
    for step, idx in enumerate(_batches(len(pairs), config.batch_size, total, rng)):
        batch, cut = collate_rows([pairs[i] for i in idx], pad_id, config.seq_len)
        batch = {k: v.to(device) for k, v in batch.items()}
        result.truncated += cut
        result.tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step, total)

        loss = labelled_loss(model, batch, head_window=head_window)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()

        value = loss.item()  # a sync point, once per step
        result.losses.append(value)
        result.steps = step + 1
        stop = bool(callback(step, value)) if callback is not None else False
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
        if stop:
            result.stopped_early = result.steps < total
            logger.info("sft stopped by its callback after step %d/%d", result.steps, total)
            break
        if (step + 1) % config.log_every == 0 or step + 1 == total:
            recent = result.losses[-config.log_every :]
            logger.info("sft step %d/%d loss %.4f", step + 1, total, sum(recent) / len(recent))
    result.seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    model.eval()
    if result.truncated:
        logger.warning(
            "%d sequences were longer than seq_len=%d and lost their tail; raise seq_len "
            "(see length_report) to train on them whole",
            result.truncated, config.seq_len,
        )
    return result
