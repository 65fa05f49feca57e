"""The benchmark workload through AgileRL's ``GRPO`` (benchmark only; AgileRL is never a runtime dependency).

AgileRL is imported from ``$AGILERL_PATH`` (see ``benchmarks/README.md``): its PyPI wheel pulls jax,
wandb and more, so it is installed into a separate ``pip install --target`` folder. It runs with its
own defaults except where the shared workload fixes a value (LoRA, group, tokens, beta, lr,
sampling); liger kernels are off (not installable on this CPU machine).
"""

from __future__ import annotations

import dataclasses

import torch

from benchmarks.workload import (
    RunResult,
    Workload,
    _sizes,
    load,
    lora,
    time_agent_steps,
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
    return time_agent_steps(agent, tok, work, result)
