"""The GRPO workload every framework runs in the benchmark: same model folder, prompts, reward and settings.

A worker process runs one framework on one configuration and returns a :class:`RunResult`:
``warmup`` untimed steps, then ``steps`` timed ones. Each framework gets a fresh process so its
peak resident memory (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PROMPTS = [
    "Using the numbers 3, 7, 9 and 12 once each, make 24. Show your work.",
    "What is 487 minus 129? Think step by step, then answer.",
    "Sort these numbers: 42, 7, 19, 3, 88, 51.",
    "A train travels 60 km in 45 minutes. What is its speed in km/h?",
    "Using 2, 5, 8 and 10 make 40 with + - * /.",
    "Compute 13 * 17 and explain each step.",
    "Which is larger, 7/9 or 0.77? Answer with a reason.",
    "Find x if 3x + 7 = 31.",
]
"""Eight user messages; a step takes four of them (cycled), each rendered with the chat template."""


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration, identical for every framework.

    Attributes:
        preset: :mod:`llm_gym.tiny` preset (``"tiny"`` 0.15M, ``"small"`` 33.6M parameters).
        prompts_per_step: Prompts per GRPO step (``P``).
        group_size: Completions per prompt (``G``).
        max_new_tokens: Generation budget per completion (``C``).
        lora_r: LoRA rank (alpha = 2r, every linear layer, no dropout).
        beta: KL coefficient (> 0, so every framework runs the reference pass).
        lr: Learning rate.
        threads: ``torch.set_num_threads`` in every worker.
        warmup: Untimed steps first.
        steps: Timed steps.
        seed: Seed of torch's RNG.
    """

    preset: str = "tiny"
    prompts_per_step: int = 4
    group_size: int = 8
    max_new_tokens: int = 32
    lora_r: int = 16
    beta: float = 0.04
    lr: float = 1e-5
    threads: int = 2
    warmup: int = 1
    steps: int = 5
    seed: int = 0

    @property
    def name(self) -> str:
        """Short id, e.g. ``small-c128``."""
        return f"{self.preset}-c{self.max_new_tokens}"


@dataclass
class RunResult:
    """What one worker measured.

    Attributes:
        framework: ``"llm-gym"``, ``"trl"`` or ``"agilerl"``.
        workload: The configuration as a dict.
        step_seconds: Wall time of each timed step.
        generated_tokens: Real completion tokens (up to the first EOS) of each timed step.
        peak_rss_mib: Peak resident memory of the worker process.
        base_rss_mib: Resident memory after loading, before the first step.
        params: Parameters of the base model (embedding included).
        matmul_params: Weights of the base model's linear layers, LM head included (FLOP estimate).
        prompt_tokens: Mean prompt length in tokens.
        error: Why the run failed, if it did.
    """

    framework: str
    workload: dict[str, Any]
    step_seconds: list[float] = field(default_factory=list)
    generated_tokens: list[int] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    base_rss_mib: float = 0.0
    params: int = 0
    matmul_params: int = 0
    prompt_tokens: float = 0.0
    error: str | None = None


def rss_mib() -> float:
    """Current resident memory of this process in MiB (Linux ``/proc``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0  # pragma: no cover - not Linux


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def digit_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """Fraction of digits in each completion: cheap, deterministic, and varies within a group.

    Args:
        completions: Completion strings, or conversational completions (lists of messages).
        **kwargs: Ignored dataset columns (TRL passes them).

    Returns:
        One float per completion.
    """
    out = []
    for c in completions:
        text = c[-1]["content"] if isinstance(c, list) else str(c)
        out.append(sum(ch.isdigit() for ch in text) / max(len(text), 1))
    return out


def messages(i: int) -> list[dict[str, str]]:
    """The ``i``-th prompt as a one-message conversation."""
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def encode_prompts(tok: Any, count: int = len(PROMPTS)) -> list[dict[str, Any]]:
    """The first ``count`` prompts (cycling) as ReasoningGym-style dicts of ``[1, L]`` ids and mask."""
    encoded = []
    for i in range(count):
        ids = tok.apply_chat_template(messages(i), add_generation_prompt=True, tokenize=True, return_dict=True)
        t = torch.tensor([ids["input_ids"]], dtype=torch.long)
        encoded.append({"input_ids": t, "attention_mask": torch.ones_like(t)})
    return encoded


def load(work: Workload) -> tuple[Any, Any, str]:
    """Set threads and seed, then load the preset's model (fp32) and tokenizer from the local folder.

    Args:
        work: The configuration.

    Returns:
        ``(model, tokenizer, path)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_gym.tiny import tiny_model_path

    torch.set_num_threads(work.threads)
    torch.manual_seed(work.seed)
    path = str(tiny_model_path(work.preset))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tok, path


def _sizes(model: Any) -> dict[str, int]:
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"params": sum(p.numel() for p in model.parameters()), "matmul_params": linear}


def lora(work: Workload) -> Any:
    """The LoRA config every framework uses."""
    from peft import LoraConfig

    return LoraConfig(
        r=work.lora_r, lora_alpha=2 * work.lora_r, lora_dropout=0.0, target_modules="all-linear",
        task_type="CAUSAL_LM",
    )  # fmt: skip


def run_llm_gym(work: Workload, **agent_kwargs: Any) -> RunResult:
    """Run the workload with :class:`llm_gym.algorithms.grpo.GRPO`.

    Args:
        work: The configuration.
        **agent_kwargs: Extra ``GRPO`` arguments (for ablations).

    Returns:
        The measurements.
    """
    from llm_gym.algorithms.grpo.agent import GRPO

    model, tok, _ = load(work)
    result = RunResult("llm-gym", dataclasses.asdict(work), **_sizes(model))
    # batch_size (rows per update forward/backward; generation is one batch of all P x G rows
    # whatever it is) stays at llm-gym's default of 16 unless an ablation sets it.
    agent = GRPO(
        model, pad_token_id=tok.pad_token_id, pad_token=tok.pad_token, lora_config=lora(work),
        group_size=work.group_size, max_output_tokens=work.max_new_tokens, lr=work.lr, beta=work.beta,
        loss_type="grpo", temperature=1.0, device="cpu", seed=work.seed, **agent_kwargs,
    )  # fmt: skip
    return time_agent_steps(agent, tok, work, result)


def time_agent_steps(agent: Any, tok: Any, work: Workload, result: RunResult) -> RunResult:
    """Time ``warmup + steps`` GRPO steps (generate, score, learn) of an agent with the GRPO API.

    Shared by llm-gym's and AgileRL's agents, which take the same ``get_action``/``learn`` calls.
    Each step gets fresh prompt dicts (AgileRL writes into them).
    """
    encoded = encode_prompts(tok)
    result.prompt_tokens = sum(e["input_ids"].shape[1] for e in encoded) / len(encoded)
    result.base_rss_mib = rss_mib()
    for step in range(work.warmup + work.steps):
        prompts = [dict(encoded[(step * work.prompts_per_step + j) % len(encoded)]) for j in range(work.prompts_per_step)]
        start = time.perf_counter()
        ids, masks = agent.get_action(prompts)[:2]
        texts = [tok.batch_decode(i[:, p["input_ids"].shape[1] :], skip_special_tokens=True)
                 for i, p in zip(ids, prompts, strict=True)]  # completions only  # fmt: skip
        rewards = torch.tensor([digit_reward(t) for t in texts])  # [P, G]
        agent.learn((ids, masks, rewards))
        elapsed = time.perf_counter() - start
        if step >= work.warmup:
            result.step_seconds.append(elapsed)
            result.generated_tokens.append(int(sum(int(m.sum()) for m in masks)))
    result.peak_rss_mib = peak_rss_mib()
    return result


def run_trl(work: Workload) -> RunResult:
    """Run the workload with TRL's ``GRPOTrainer`` (LoRA through ``peft_config``, reference = adapter off).

    Args:
        work: The configuration.

    Returns:
        The measurements.
    """
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tok, _ = load(work)
    result = RunResult("trl", dataclasses.asdict(work), **_sizes(model))
    counted: list[int] = []

    def reward(completions: list[Any], completion_ids: list[list[int]] | None = None, **kwargs: Any) -> list[float]:
        if completion_ids is not None:
            counted.append(sum(len(c) for c in completion_ids))
        return digit_reward(completions)

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()
            if state.global_step == work.warmup:
                counted.clear()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step > work.warmup:
                result.step_seconds.append(time.perf_counter() - self.start)

    total = work.warmup + work.steps
    rows = [{"prompt": messages(i)} for i in range(total * work.prompts_per_step)]
    result.prompt_tokens = sum(
        len(tok.apply_chat_template(messages(i), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for i in range(len(PROMPTS))
    ) / len(PROMPTS)
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=work.prompts_per_step * work.group_size,
            num_generations=work.group_size, gradient_accumulation_steps=1, max_completion_length=work.max_new_tokens,
            beta=work.beta, learning_rate=work.lr, loss_type="grpo", temperature=1.0, top_k=0, top_p=1.0,
            max_steps=total, logging_steps=10_000, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
            fp16=False, seed=work.seed, dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False,
            lr_scheduler_type="constant",
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=model, reward_funcs=[reward], args=config, train_dataset=Dataset.from_list(rows),
            processing_class=tok, peft_config=lora(work), callbacks=[Timer()],
        )  # fmt: skip
        torch.set_num_threads(work.threads)  # Trainer setup may touch it: set again
        result.base_rss_mib = rss_mib()
        trainer.train()
    per_step = len(counted) // max(work.steps, 1)
    result.generated_tokens = [sum(counted[i * per_step : (i + 1) * per_step]) for i in range(work.steps)]
    result.peak_rss_mib = peak_rss_mib()
    return result
