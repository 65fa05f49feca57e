"""GPU smoke test of the vLLM backend: run it once on a CUDA machine before trusting ``use_vllm=True``.

    pip install "llm-gym[vllm]"
    python -m benchmarks.vllm_smoke --model Qwen/Qwen2.5-0.5B-Instruct      # about 5 minutes on one GPU

The test suite never runs it (vLLM needs CUDA); it only checks that it compiles and imports. Each
check prints PASS/FAIL with its numbers; all of them land in ``benchmarks/results/vllm_smoke.json``
and the exit code is 1 if any failed:

1. ``engine``: the agent and its colocated engine start (seconds, executor, GPU memory);
2. ``hf_parity``: with the fresh adapter (``lora_B = 0``, i.e. no adapter) vLLM's greedy tokens equal
   the HF backend's for the first ``--parity-tokens`` tokens of every prompt;
3. ``adapter_changes_output``: a perturbed adapter changes vLLM's greedy outputs (the edit is made
   outside ``learn``, so this also checks the re-sync on a changed adapter);
4. ``second_update``: a second perturbation changes them again and the old LoRA id is gone from the engine;
5. ``sleep_wake``: a level-1 sleep frees GPU memory and greedy outputs after waking are identical;
6. ``logprob_drift``: mean and max |log-prob difference| between vLLM and the trainer on sampled
   completions (the off-policy drift an importance-sampling correction would fix), and the mean
   truncated importance weight.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = [
    "What is 17 + 25? Answer with the number only.",
    "Name the capital of France.",
    "Write one sentence about the sea.",
    "Using the numbers 3, 5 and 7 once each, reach 22 with + - * /.",
]
logger = logging.getLogger("benchmarks.vllm_smoke")


def _prompts(tokenizer: Any) -> list[dict[str, Any]]:
    prompts = []
    for question in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt")  # fmt: skip
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # [1, L]
        prompts.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "text": None})
    return prompts


def _generated(ids: list[torch.Tensor], masks: list[torch.Tensor], prompts: list[dict[str, Any]]) -> list[list[int]]:
    """Each prompt's first completion, generated tokens only (up to and including its EOS)."""
    out = []
    for row, mask, p in zip(ids, masks, prompts, strict=True):
        start = p["input_ids"].shape[-1]
        out.append(row[0, start : start + int(mask[0].sum())].tolist())
    return out


def _perturb(agent: Any, std: float, seed: int) -> None:
    """Random ``lora_B`` (in place, outside ``learn``): the adapter now changes the model."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    marker = f".{agent.adapter_name}."
    with torch.no_grad():
        for name, param in agent.model.named_parameters():
            if "lora_B" in name and marker in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _free_gib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / 2**30


def _drift(agent: Any, prompts: list[dict[str, Any]]) -> dict[str, float]:
    """Sample, then score the same tokens with the trainer: vLLM's vs the trainer's log-probs."""
    from llm_gym.algorithms.grpo.logps import completion_logps
    from llm_gym.algorithms.rollout.completions import mini_batches, pack_completions
    from llm_gym.algorithms.rollout.vllm import logprob_drift, truncated_importance_weights

    ids, masks = agent.get_action(prompts)
    rollout = [r for per_prompt in agent.backend.last_logprobs[0] for r in per_prompt]  # rows [S_i - 1]
    packed = pack_completions(ids, masks, agent.group_size, agent.pad_token_id)
    rows = torch.zeros(packed.mask.shape)  # [B, T - 1], laid out like the packed mask
    for b, r in enumerate(rollout):
        rows[b, : len(r)] = r
    mb = mini_batches(packed, packed.ids.shape[0], agent.device)[0]
    rows = rows[:, : mb.ids.shape[1] - 1][:, mb.first :]  # the mini-batch's completion window
    agent.model.eval()
    with torch.no_grad():
        trainer, _ = completion_logps(agent.model, mb)
    mask = mb.mask.cpu()
    result = logprob_drift(trainer.cpu(), rows, mask)
    result["mean_is_weight"] = float(truncated_importance_weights(trainer.cpu(), rows, mask)[mask].mean())
    return result


def run_checks(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run the six checks (see the module docstring) and return their results by name."""
    from transformers import AutoTokenizer

    from llm_gym.algorithms import GRPO, VLLMConfig
    from llm_gym.algorithms.rollout.backend import SamplingConfig
    from llm_gym.algorithms.rollout.hf import HFGenerationBackend

    results: dict[str, dict[str, Any]] = {}
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = _prompts(tokenizer)
    free_start, start = _free_gib(), time.perf_counter()
    config = VLLMConfig(sleep_mode=True, gpu_memory_utilization=args.gpu_memory_utilization, logprobs=True)
    agent = GRPO(model_name=args.model, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                 group_size=4, max_output_tokens=args.tokens, max_model_len=1024, use_vllm=True, vllm_config=config,
                 dtype=getattr(torch, args.dtype), seed=0)  # fmt: skip
    backend, engine = agent.backend, agent.backend.llm.llm_engine
    results["engine"] = {"pass": True, "seconds": time.perf_counter() - start, "free_gib_before": free_start,
                         "free_gib_after": _free_gib(),
                         "executor": backend.engine_kwargs.get("distributed_executor_backend", "vLLM default")}  # fmt: skip

    base = _generated(*agent.get_action(prompts, training=False), prompts)
    hf = HFGenerationBackend(agent.model, agent.pad_token_id, agent.eos_token_ids).generate(
        prompts, SamplingConfig(group_size=1, max_new_tokens=args.tokens, greedy=True))  # fmt: skip
    hf_tokens = _generated(hf.completion_ids, hf.action_masks, prompts)
    n = args.parity_tokens
    first_diff = [next((t for t, (a, b) in enumerate(zip(v, h, strict=False)) if a != b), None)
                  for v, h in zip(base, hf_tokens, strict=True)]  # fmt: skip
    results["hf_parity"] = {"pass": all(v[:n] == h[:n] for v, h in zip(base, hf_tokens, strict=True)),
                            "compared_tokens": n, "first_difference_per_prompt": first_diff}  # fmt: skip

    ids_before = engine.list_loras()
    _perturb(agent, args.noise, seed=1)
    first = _generated(*agent.get_action(prompts, training=False), prompts)
    ids_first = engine.list_loras()
    results["adapter_changes_output"] = {"pass": first != base, "prompts_changed": sum(a != b for a, b in zip(
        first, base, strict=True)), "lora_ids": [sorted(ids_before), sorted(ids_first)]}  # fmt: skip

    _perturb(agent, args.noise, seed=2)
    second = _generated(*agent.get_action(prompts, training=False), prompts)
    ids_second = engine.list_loras()
    results["second_update"] = {"pass": second != first and not (ids_first & ids_second) and len(ids_second) == 1,
                                "lora_ids": sorted(ids_second), "old_ids_gone": not (ids_first & ids_second)}

    backend.wake_up()  # until the first sleep() the backend sleeps after every call: measure it awake
    awake = _free_gib()
    backend.sleep()
    asleep = _free_gib()
    again = _generated(*agent.get_action(prompts, training=False), prompts)  # wakes lazily
    results["sleep_wake"] = {"pass": asleep - awake > 0.1 and again == second, "freed_gib": asleep - awake,
                             "identical_after_wake": again == second}  # fmt: skip

    drift = _drift(agent, prompts)
    results["logprob_drift"] = {"pass": drift["mean_abs"] < args.max_drift, **drift}
    backend.close()
    results["engine"]["free_gib_after_close"] = _free_gib()
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt")
    parser.add_argument("--parity-tokens", type=int, default=16, help="tokens that must equal the HF backend's")
    parser.add_argument("--noise", type=float, default=0.05, help="std of the random lora_B of an update")
    parser.add_argument("--max-drift", type=float, default=0.1, help="largest mean |log-prob difference| to pass")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=RESULTS / "vllm_smoke.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not torch.cuda.is_available():
        sys.stderr.write("the vLLM smoke test needs a CUDA GPU\n")
        return 2
    results = run_checks(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "dtype": args.dtype, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0), "vllm": __import__("vllm").__version__}  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "checks": results}, indent=1))
    for name, result in results.items():
        numbers = {k: v for k, v in result.items() if k != "pass"}
        sys.stdout.write(f"{'PASS' if result['pass'] else 'FAIL'}  {name}: {json.dumps(numbers)}\n")
    return 0 if all(r["pass"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
