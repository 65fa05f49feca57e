"""The python half of ``benchmarks/gpu_check.sh``: population GRPO on one device, timed, LoRA-only checked.

Runs ``--steps`` GRPO steps of a population of ``--population`` agents (one base model, one LoRA
adapter each: :func:`~llm_gym.algorithms.grpo.population.create_population`) on Countdown with the
HF backend, then one check step on fixed, distinct rewards (so every adapter certainly gets a
gradient, whatever the policy earned), and verifies that the base weights did not move and that
every agent's every ``lora_B`` did. Prints step time, generated tokens/s and peak GPU memory.

It imports only ``llm_gym`` (and gymnasium through it), torch, transformers and peft: no
``datasets``, no hub, no network. Run it as a file (``python benchmarks/gpu_check.py``), not with
``-m``, so that the repository's ``llm_gym/`` folder does not shadow an installed wheel.

``--model`` is a model folder. A folder without weights (only ``config.json`` and the tokenizer)
gets random weights in that architecture, said plainly in the output: step time, tokens/s and
memory depend on the architecture and lengths, not on the weights, but a random model never stops
early, so every completion runs to the token budget (the slowest case). ``--dry`` shrinks every
budget to seconds, for CPU tests. Exit status 0 when the LoRA-only check passes, 1 when it fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (weights optional); default: the embedded tiny model")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed GRPO steps (the first one is warm-up)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--task", default="llm_gym/Countdown-v0")
    parser.add_argument("--dry", action="store_true", help="tiny budgets (2 steps, 2x2 completions, 8 tokens)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.dry:
        args.steps, args.prompts, args.group, args.max_new_tokens = 2, 2, 2, 8
    return args


def _load(args: argparse.Namespace, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """(model, tokenizer, a plain sentence naming the weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from llm_gym.tiny import tiny_model_path

        path = str(tiny_model_path("tiny"))
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path), \
            "the embedded tiny model (random weights)"
    folder = Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), tokenizer, f"pretrained, from {folder}"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    return model, tokenizer, f"RANDOM weights in the architecture of {folder} (no weights file there)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # timings must include the queued kernels


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, time and check; returns the results (also printed by :func:`main`)."""
    from peft import LoraConfig

    from llm_gym.algorithms.grpo.population import create_population
    from llm_gym.models import lora_target_modules
    from llm_gym.reasoning_gym import ReasoningGym

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model, tokenizer, weights = _load(args, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    env = ReasoningGym.from_task(args.task, tokenizer, train_size=max(64, args.prompts * (args.steps + 2)),
                                 test_size=2, seed=0, data_batch_size_per_gpu=args.prompts)  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=lora_target_modules(args.model) if args.model else "all-linear")  # fmt: skip
    pop = create_population(
        args.population, model_name=model, pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token,
        lora_config=lora, batch_size=args.prompts * args.group, group_size=args.group,
        max_output_tokens=args.max_new_tokens, lr=1e-4, device=str(device), dtype=dtype, seed=0,
    )  # fmt: skip
    load_s = time.perf_counter() - start
    peft_model = pop[0].model
    base0 = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    lora0 = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}

    step_s, gen_s, tokens, rewards_seen = [], 0.0, 0, []
    prompts = env.reset()
    for step in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        step_gen, step_tokens = 0.0, 0
        for agent in pop:
            g0 = time.perf_counter()
            ids, masks = agent.get_action(prompts)
            _sync(device)
            step_gen += time.perf_counter() - g0
            step_tokens += int(sum(int(m.sum()) for m in masks))
            rewards = env.score(ids)
            rewards_seen.append(float(rewards.mean()))
            agent.learn((ids, masks, rewards))
        _sync(device)
        step_s.append(time.perf_counter() - t0)
        if step > 0 or args.steps == 1:  # step 0 warms up kernels and allocators
            gen_s, tokens = gen_s + step_gen, tokens + step_tokens
        prompts = env.reset()

    # The check step: distinct rewards in every group, so each adapter gets a non-zero gradient.
    fixed = torch.tensor([[float(i % 2) for i in range(args.group)]] * args.prompts)
    for agent in pop:
        ids, masks = agent.get_action(prompts)
        agent.learn((ids, masks, fixed))
    params = dict(peft_model.named_parameters())
    base_moved = [n for n in base0 if not torch.equal(base0[n], params[n])]
    b_names = [n for n in lora0 if "lora_B" in n]
    unmoved = [n for n in b_names if torch.equal(lora0[n], params[n])]
    timed = step_s[1:] if len(step_s) > 1 else step_s
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "llm_gym_from": str(Path(sys.modules["llm_gym"].__file__).parent),
        "weights": weights,
        "dtype": args.dtype,
        "population": args.population,
        "task": args.task,
        "prompts_x_group": f"{args.prompts}x{args.group}",
        "max_new_tokens": args.max_new_tokens,
        "load_s": round(load_s, 2),
        "step_s_mean": round(sum(timed) / len(timed), 3),
        "step_s_all": [round(s, 3) for s in step_s],
        "generated_tokens_per_s": round(tokens / gen_s, 1) if gen_s > 0 else None,
        "reward_mean": round(sum(rewards_seen) / len(rewards_seen), 3),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
        else None,
        "base_params_changed": len(base_moved),
        "lora_b_params": len(b_names),
        "lora_b_params_unchanged": len(unmoved),
        "lora_only_ok": not base_moved and not unmoved and len(b_names) > 0,
    }
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the check, print one ``key: value`` line per result; 0 when the LoRA-only check passed."""
    args = _parse(argv)
    results = run(args)
    for key, value in results.items():
        print(f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print("GPU CHECK " + ("PASSED" if results["lora_only_ok"] else "FAILED: LoRA-only update check"))
    return 0 if results["lora_only_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
