"""Ablation of the GRPO-step optimisations, in one process with configurations interleaved step by step.

Run from the repository root::

    .venv/bin/python -m benchmarks.ablation --tokens 32 --steps 8

Each timed step runs every configuration once, in rotating order, so the drift of a shared machine
hits them alike; medians of the generation and update times are reported per configuration.
Configurations switch the optimisations of :mod:`llm_gym.algorithms.rollout.decoding` on one at a time:

* ``generate``: ``transformers`` ``generate``, reference pass under ``disable_adapter()``, logits
  for every position (the state before the optimisations);
* ``lean``: the lean decoding loop (shared prefill, own sampling, finished rows dropped, own mask);
* ``lean+merge``: and merged LoRA weights while decoding;
* ``window``: and the update computes logits only for the completion window, with the reference
  pass on the swapped-in base layers;
* ``shared-prompt``: and each prompt's forward in the update runs once per group, its KV cache
  shared by the group's completions (:mod:`llm_gym.algorithms.grpo.logps`);
* ``prealloc``: and the decoding KV cache lives in buffers allocated once, written in place
  (:mod:`llm_gym.algorithms.plumbing.kv_cache`);
* ``fused-lora``: and the policy pass runs LoRA layers as one in-place ``addmm`` each
  (:func:`llm_gym.algorithms.lora_swap.fused_lora`): the default.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from benchmarks.workload import Workload, digit_reward, encode_prompts, load, lora

logger = logging.getLogger("benchmarks.ablation")

CONFIGS = ("generate", "lean", "lean+merge", "window", "shared-prompt", "prealloc", "fused-lora")


def _logps_before(agent: Any, mb: Any, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``GRPO._logps`` as it was before the update optimisations: padding mask, logits everywhere."""
    from llm_gym.algorithms.grpo.logps import selective_log_softmax, token_entropy

    logits = agent.model(input_ids=mb.ids, attention_mask=mb.attention, use_cache=False).logits
    logits = logits[:, mb.first : -1]
    logp = selective_log_softmax(logits, mb.ids[:, mb.first + 1 :])
    return logp, (token_entropy(logits.detach()) if entropy else None)


@contextlib.contextmanager
def configured(agent: Any, name: str) -> Iterator[None]:
    """Switch the agent to configuration ``name`` for the duration of the block."""
    from llm_gym.algorithms.grpo import update as grpo

    backend = agent.backend
    saved = (backend.use_generate, backend.merge_lora, grpo.base_model_only, agent.share_prompt_forward,
             backend.preallocate_cache, agent.fuse_lora)  # fmt: skip
    rank = CONFIGS.index(name)
    backend.use_generate = name == "generate"
    backend.merge_lora = rank >= CONFIGS.index("lean+merge")
    agent.share_prompt_forward = rank >= CONFIGS.index("shared-prompt")
    backend.preallocate_cache = rank >= CONFIGS.index("prealloc")
    agent.fuse_lora = rank >= CONFIGS.index("fused-lora")
    if rank < CONFIGS.index("window"):
        grpo.base_model_only = lambda model: model.disable_adapter()
        agent._logps = lambda mb, entropy=False: _logps_before(agent, mb, entropy)
    try:
        yield
    finally:
        (backend.use_generate, backend.merge_lora, grpo.base_model_only, agent.share_prompt_forward,
         backend.preallocate_cache, agent.fuse_lora) = saved  # fmt: skip
        agent.__dict__.pop("_logps", None)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS,
                        help="configurations to compare (the first is the baseline of the last column)")
    args = parser.parse_args(argv)
    configs = tuple(args.configs)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    from llm_gym.algorithms.grpo.agent import GRPO

    work = Workload(preset=args.preset, max_new_tokens=args.tokens, threads=args.threads)
    model, tok, _ = load(work)
    agent = GRPO(
        model, pad_token_id=tok.pad_token_id, pad_token=tok.pad_token, lora_config=lora(work),
        batch_size=work.prompts_per_step * work.group_size, group_size=work.group_size,
        max_output_tokens=work.max_new_tokens, lr=work.lr, beta=work.beta, loss_type="grpo", temperature=1.0,
        device="cpu", seed=work.seed,
    )  # fmt: skip
    encoded = encode_prompts(tok, 8)
    times: dict[str, dict[str, list[float]]] = {c: {} for c in configs}
    for step in range(args.steps + 1):
        order = configs[step % len(configs) :] + configs[: step % len(configs)]
        for name in order:
            prompts = [encoded[(step * 4 + j) % len(encoded)] for j in range(4)]
            with configured(agent, name):
                cpu_start, start = time.process_time(), time.perf_counter()
                ids, masks = agent.get_action(prompts)
                cpu_mid, mid = time.process_time(), time.perf_counter()
                texts = [tok.batch_decode(i[:, p["input_ids"].shape[1] :], skip_special_tokens=True)
                         for i, p in zip(ids, prompts, strict=True)]  # fmt: skip
                agent.learn((ids, masks, torch.tensor([digit_reward(t) for t in texts])))
                cpu_end, end = time.process_time(), time.perf_counter()
            if step > 0:  # the first round is warm-up
                for key, value in (("gen", mid - start), ("learn", end - mid), ("step", end - start),
                                   ("gen_cpu", cpu_mid - cpu_start), ("learn_cpu", cpu_end - cpu_mid),
                                   ("step_cpu", cpu_end - cpu_start)):  # fmt: skip
                    times[name].setdefault(key, []).append(value)
    base = {k: statistics.median(times[configs[0]][k]) for k in ("step", "step_cpu")}
    lines = [
        f"{work.name}, {args.steps} interleaved steps, {args.threads} thread(s); medians in ms, wall clock and "
        f"(in brackets) this process's CPU time, which other jobs on a shared machine disturb less",
        "",
        f"| configuration | generation | update | step | step vs {configs[0]} |",
        "|---|---|---|---|---|",
    ]
    for name in configs:
        med = {k: 1000 * statistics.median(v) for k, v in times[name].items()}
        lines.append(
            f"| {name} | {med['gen']:.1f} ({med['gen_cpu']:.1f}) | {med['learn']:.1f} ({med['learn_cpu']:.1f}) | "
            f"{med['step']:.1f} ({med['step_cpu']:.1f}) | {med['step'] / 1000 / base['step']:.2f} "
            f"({med['step_cpu'] / 1000 / base['step_cpu']:.2f}) |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
