"""Launch helpers and worker bodies for the data-parallel tests (imported as `distributed_workers`).

The workers run in processes started like ``torchrun`` does (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``) and join a gloo process group; the same function
run without those variables is the one-process reference.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment, with the repository and this folder importable, one thread, offline."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def launch(
    code: str, args: list[str], world: int = 2, timeout: float = 300, cwd: Path | None = None, **env: str
) -> list[subprocess.CompletedProcess]:
    """Run ``python -c code *args`` as ``world`` processes of one gloo group; returns them in rank order."""
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=cwd, env=child_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env))  # fmt: skip
        for r in range(world)
    ]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


# ---------------------------------------------------------------- one GRPO update
def _experience(world: int, rank: int) -> tuple[list, list, torch.Tensor]:
    """4 prompts x 3 completions of different lengths (fixed), this process's prompts ``rank::world``."""
    gen = torch.Generator().manual_seed(5)
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.2, 0.4, 0.9]])
    ids, masks = [], []
    for p in range(4):
        prompt_len, comp_len = 3 + p % 3, 4 + p
        seq = torch.randint(3, 100, (3, prompt_len + comp_len), generator=gen)
        mask = torch.zeros(3, prompt_len + comp_len - 1, dtype=torch.bool)
        for g in range(3):
            n = comp_len - g  # completions of different lengths: an EOS, then padding
            mask[g, prompt_len - 1 : prompt_len - 1 + n] = True
            seq[g, prompt_len + n :] = 0
        ids.append(seq)
        masks.append(mask)
    keep = list(range(rank, 4, world))
    return [ids[i] for i in keep], [masks[i] for i in keep], rewards[keep]


def one_update(loss_type: str, beta: float, update_epochs: int) -> dict:
    """One GRPO update of a tiny agent on this process's share of a fixed batch: the gradients
    the optimizer stepped with, the loss and the adapter afterwards."""
    from grpo_tiny import make_agent

    from llm_gym.algorithms.plumbing.distributed import rank, world_size

    agent = make_agent(loss_type=loss_type, beta=beta, update_epochs=update_epochs, batch_size=4, group_size=3)
    params = agent._adapter_params()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # LoRA B starts at 0 (A's gradient would be 0): give every matrix values
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    grads: list[list[torch.Tensor]] = []
    step = agent.optimizer.step

    def recording_step(*args, **kwargs):
        grads.append([p.grad.detach().clone() for p in params])
        return step(*args, **kwargs)

    agent.optimizer.step = recording_step
    metrics = agent.learn(_experience(world_size(), rank()))
    return {"grads": grads, "loss": metrics["loss"], "after": [p.detach().clone() for p in params]}


UPDATE_CASES = [("grpo", 0.0, 1), ("dapo", 0.04, 2), ("dr_grpo", 0.0, 1)]
"""(loss_type, beta, update_epochs) of the update comparisons: one launch runs them all."""

UPDATE_WORKER = """
import sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
from distributed_workers import UPDATE_CASES, one_update
out = {case: one_update(*case) for case in UPDATE_CASES}
torch.save(out, f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


# ---------------------------------------------------------------- a sharded evaluation
def _digit_reward(completion: str, answer: str, question: str) -> float:
    """A reward that moves with every generated character (the tiny random model never answers right)."""
    return sum(ord(c) for c in completion) % 11 / 10


def tiny_env(batch: int = 2, accelerator=None, test_rows: list[int] | None = None):
    """A ReasoningGym of 4 train and 5 test problems (or rows ``test_rows`` of them) on the tiny character tokenizer."""
    from grpo_tiny import make_tokenizer

    from llm_gym.reasoning_gym import ReasoningGym

    rows = [{"question": f"{a}+{a}", "answer": str(2 * a)} for a in range(9)]
    test = rows[4:] if test_rows is None else [rows[4 + i] for i in test_rows]
    return ReasoningGym(rows[:4], test, make_tokenizer(), _digit_reward, [{"role": "user", "content": "{question}"}],
                        data_batch_size_per_gpu=batch, accelerator=accelerator)  # fmt: skip


def sharded_evaluation(out_dir: str) -> dict:
    """The greedy evaluation of a tiny agent on :func:`tiny_env`'s test split, through DataParallel."""
    from grpo_tiny import make_agent

    from llm_gym.algorithms.run.distributed import DataParallel

    dp = DataParallel.from_environment()
    env = tiny_env()
    dp.prepare_env(env)
    agent = make_agent(max_output_tokens=5)
    out = {"metrics": dp.evaluate(agent, env, split="test"), "prompts": env.reset()}
    # AgileRL's layout: the env shards the data itself (its accelerator), 2 prompts per process and batch.
    from types import SimpleNamespace

    own = tiny_env(accelerator=SimpleNamespace(num_processes=dp.world_size, process_index=dp.rank))
    dp_own = DataParallel(rank=dp.rank, world_size=dp.world_size)
    dp_own.prepare_env(own)
    out["data_sharded"] = dp_own.data_sharded
    out["own_shard"] = dp_own.evaluate(agent, own, split="test")
    # Two training steps in that layout: every process its own 2 prompts a step, gradients summed.
    from llm_gym.algorithms.run.loop import finetune_llm_reasoning

    before = [p.detach().clone() for p in agent._adapter_params()]
    finetune_llm_reasoning([agent], own, max_steps=2, evo_steps=None, evaluation_interval=2, eval_problems=None,
                           log_dir=f"{out_dir}/run", verbose=False, data_parallel=dp_own)  # fmt: skip
    out["trained_prompts"] = dp_own.prompts
    out["adapter_moved"] = max(float((p - b).abs().max()) for p, b in zip(agent._adapter_params(), before, strict=True))
    out["adapter_after"] = [p.detach().clone() for p in agent._adapter_params()]
    return out


EVAL_WORKER = """
import sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
from distributed_workers import sharded_evaluation
out = sharded_evaluation(sys.argv[1])
torch.save(out, f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


# ---------------------------------------------------------------- AgileRL's tutorial script
SEED_WORKER = """
import logging
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from llm_gym.tiny import tiny_model_path
from tests.seed001 import ported_script
from tests.test_seed001_script import fake_load_dataset
namespace = {"__name__": "seed001"}
exec(compile(ported_script(), "seed001.py", "exec"), namespace)
namespace.update(MODEL_PATH=str(tiny_model_path("tiny")), DATASET="local/countdown-3to4", USE_VLLM=False,
                 load_dataset=fake_load_dataset)
namespace["main"]()
"""
"""The seed 001 script with test_seed001_script.py's substitutions, its ``main()`` run in each process."""
