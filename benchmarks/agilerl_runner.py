"""The benchmark workload through AgileRL's ``GRPO`` (benchmark only; AgileRL is never a runtime dependency).

AgileRL is imported from ``$AGILERL_PATH`` (see ``benchmarks/README.md``): its PyPI wheel pulls jax,
wandb and more, so it is installed into a separate ``pip install --target`` folder. It runs with its
own defaults except where the shared workload fixes a value (LoRA, group, tokens, beta, lr,
sampling); liger kernels are off (not installable on this CPU machine).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from benchmarks.workload import (
    RunResult,
    Workload,
    _sizes,
    digit_reward,
    encode_prompts,
    load,
    lora,
    peak_rss_mib,
    rss_mib,
)


def run_agilerl(work: Workload) -> RunResult:
    """Run the workload with AgileRL's ``GRPO`` (``get_action`` then ``learn`` per step).

    Args:
        work: The configuration.

    Returns:
        The measurements.
    """
    import agilerl

    # Its "cpu-llm" extra lists bitsandbytes, liger-kernel (triton) and openenv, none of which
    # this CPU run uses (no quantisation, use_liger_loss=False): skip the distribution check.
    agilerl.HAS_LLM_DEPENDENCIES = True
    from agilerl.algorithms.grpo import GRPO as AgileGRPO

    model, tok, _ = load(work)
    result = RunResult("agilerl", dataclasses.asdict(work), **_sizes(model))
    agent = AgileGRPO(
        pad_token_id=tok.pad_token_id, pad_token=tok.pad_token, actor_network=model, lora_config=lora(work),
        batch_size=work.prompts_per_step * work.group_size, beta=work.beta, lr=work.lr,
        group_size=work.group_size, temperature=1.0, top_k=0, max_output_tokens=work.max_new_tokens,
        max_model_len=512, device="cpu", seed=work.seed, use_liger_loss=False,
    )  # fmt: skip
    torch.set_num_threads(work.threads)
    encoded = encode_prompts(tok)
    result.prompt_tokens = sum(e["input_ids"].shape[1] for e in encoded) / len(encoded)
    result.base_rss_mib = rss_mib()
    for step in range(work.warmup + work.steps):
        prompts = [dict(encoded[(step * work.prompts_per_step + j) % len(encoded)]) for j in range(work.prompts_per_step)]
        lengths = [p["input_ids"].shape[1] for p in prompts]
        start = time.perf_counter()
        ids, masks = agent.get_action(prompts)[:2]
        texts = [tok.batch_decode(i[:, n:], skip_special_tokens=True) for i, n in zip(ids, lengths, strict=True)]
        rewards = torch.tensor([digit_reward(t) for t in texts])  # [P, G]
        agent.learn((ids, masks, rewards))
        elapsed = time.perf_counter() - start
        if step >= work.warmup:
            result.step_seconds.append(elapsed)
            result.generated_tokens.append(int(sum(int(m.sum()) for m in masks)))
    result.peak_rss_mib = peak_rss_mib()
    return result
