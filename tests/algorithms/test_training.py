"""finetune_llm_reasoning on the tiny model: evaluation schedule, evolution, elites, logs, resume after SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from grpo_tiny import single_thread
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import llm_gym.algorithms.run.loop as training
from llm_gym.algorithms import (
    HyperparameterConfig,
    Mutations,
    RLParameter,
    TournamentSelection,
    create_population,
    finetune_llm_reasoning,
    load_elite,
)
from llm_gym.algorithms.run.checkpoints import load_population
from llm_gym.algorithms.run.loggers import read_csv_metrics
from llm_gym.reasoning_gym import ReasoningGym
from llm_gym.tiny import tiny_model_path

_one_thread = pytest.fixture(autouse=True)(single_thread)
GENES = HyperparameterConfig(clip_coef=RLParameter(0.05, 0.5), group_size=RLParameter(2, 8, dtype=int),
                             lr=RLParameter(1e-4, 1e-1, log_scale=True))  # fmt: skip


def length_reward(completion, answer, question):
    """Longer completions (up to 12 characters) score more: rewards vary within groups and between agents."""
    return min(len(completion), 12) / 12


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in training.SMOKE_CAPS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def model_path():
    return str(tiny_model_path("tiny"))


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


def make_env(tokenizer):
    return ReasoningGym.from_task("llm_gym/Countdown-v0", tokenizer, train_size=64, test_size=4,
                                  data_batch_size_per_gpu=2, seed=0, reward_fn=length_reward)  # fmt: skip


def make_pop(model_path, tokenizer, size):
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return create_population(size, model_name=model_path, pad_token_id=tokenizer.pad_token_id, device="cpu",
                             seed=0, group_size=2, max_output_tokens=6, lr=1e-2, lora_config=lora)  # fmt: skip


def evolution(seed=0, size=3):
    return (TournamentSelection(tournament_size=2, elitism=True, population_size=size, rand_seed=seed),
            Mutations(no_mutation=0.0, rl_hp=1.0, mutation_sd=0.5, rand_seed=seed, hp_config=GENES))  # fmt: skip


def adapter(agent):
    return [p.detach().clone() for n, p in agent.model.named_parameters() if f".{agent.adapter_name}." in n]


def test_population_run_evaluates_evolves_saves_elites_and_logs(model_path, tokenizer, tmp_path, monkeypatch, caplog):
    env = make_env(tokenizer)
    eval_batches = []  # (evaluation_mode, problems) of every scored batch
    real_score = env.score

    def spy_score(completions):
        eval_batches.append((env.evaluation_mode, [p["target"] for p in env.pending_problems()]))
        return real_score(completions)

    env.score = spy_score
    saved = []  # (step, agent index, fitness, greedy ids) at each elite save
    real_save = training._save_elite
    probe = env.reset()

    def spy_save(elites, agent, step, env_):
        real_save(elites, agent, step, env_)
        saved.append((step, agent.index, agent.fitness[-1], agent.get_action(probe, training=False)[0]))

    monkeypatch.setattr(training, "_save_elite", spy_save)
    tournament, mutation = evolution()
    caplog.set_level(logging.WARNING)
    pop = finetune_llm_reasoning(
        make_pop(model_path, tokenizer, 3), env, evo_steps=2, tournament=tournament, mutation=mutation,
        max_steps=6, evaluation_interval=2, wb=True, save_elite=True, elite_path="elites", keep_elites=2,
        log_dir="run", eval_problems=4, sample_interval=3, verbose=False,
    )  # fmt: skip

    assert any("wandb is not installed" in r.message for r in caplog.records)  # warned, and the run completed
    # Fitness: at steps 2, 4, 6, each of the 3 agents scored the same 4 test problems (2 batches of 2);
    # the population is decoded together, so the 3 agents answer batch 1, then all 3 answer batch 2.
    evals = [problems for is_eval, problems in eval_batches if is_eval]
    assert len(evals) == 3 * 3 * 2
    assert evals[0] != evals[3]
    assert evals == ([evals[0]] * 3 + [evals[3]] * 3) * 3
    metrics = read_csv_metrics(tmp_path / "run" / "metrics.csv")
    assert [s for s, _ in metrics["evo/fitness_max"]] == [2, 4, 6]
    assert [s for s, _ in metrics["agent0/loss"]] == [1, 2, 3, 4, 5, 6]
    for key in ("train/reward_mean", "agent1/train/reward/total", "agent2/eval/reward/total", "agent0/hp/lr",
                "agent2/grpo/clip_fraction", "evo/fitness_mean"):  # fmt: skip
        assert key in metrics, key

    # Selection and mutation on the real agents: lineage names parents, mutations match the hps.
    assert [a.index for a in pop][0] == pop[0].lineage[-1]["agent"] and pop[0].lineage[-1]["event"] == "elite"
    genes_seen = set()
    for agent in pop[1:]:
        selected = [e for e in agent.lineage if e["event"] == "selected" and e["agent"] == agent.index]
        mutated = [e for e in agent.lineage if e["event"] == "mutation" and e["agent"] == agent.index]
        assert len(selected) == 1 and len(mutated) == 1 and selected[0]["generation"] == 3
        assert selected[0]["parent"] in selected[0]["contestants"]
        hp, new = mutated[0]["hp"], mutated[0]["new"]
        genes_seen.add(hp)
        value = {"clip_coef": agent.hps.clip_low, "group_size": agent.hps.group_size, "lr": agent.hps.lr}[hp]
        assert value == new and agent.optimizer.param_groups[0]["lr"] == agent.hps.lr
    assert {e["hp"] for a in pop for e in a.lineage if e["event"] == "mutation"} >= genes_seen
    assert {a.adapter_name for a in pop} == set(pop[0].model.peft_config)  # discarded adapters were deleted

    # Elites: 3 saves (steps 2, 4, 6), the best 2 kept, ordered by (-fitness, step).
    assert [s[0] for s in saved] == [2, 4, 6]
    best = sorted(saved, key=lambda s: (-s[2], s[0]))[:2]
    index = json.loads((tmp_path / "elites" / "index.json").read_text())
    assert [(e["step"], e["agent"]) for e in index] == [(s[0], s[1]) for s in best]
    assert len([p for p in (tmp_path / "elites").iterdir() if p.name.startswith("elite-")]) == 2
    top = tmp_path / "elites" / index[0]["path"]
    meta = json.loads((top / "elite.json").read_text())
    assert meta["metadata"]["task"] == "llm_gym/Countdown-v0" and meta["metadata"]["base_model"] == model_path
    assert meta["fitness"] == best[0][2] and meta["metadata"]["lineage"] and "lr" in meta["metadata"]["hyperparameters"]
    # The same greedy completion from peft directly, from load_elite, and from the agent when saved.
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), str(top)).eval()
    model, tok = load_elite("elites")  # the elite root: its best elite
    assert tok.pad_token_id == tokenizer.pad_token_id
    expected = best[0][3]
    for i, p in enumerate(probe):
        prompt_len = p["input_ids"].shape[1]
        want = expected[i][0, prompt_len:]
        want = want[: int((want != tokenizer.pad_token_id).sum())]  # drop right padding
        for m in (peft_model, model):
            out = m.generate(p["input_ids"], attention_mask=p["attention_mask"], do_sample=False,
                             max_new_tokens=6, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=pop[0].eos_token_ids)[0, prompt_len:]  # fmt: skip
            assert out[: len(want)].tolist() == want.tolist()

    png = (tmp_path / "run" / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    samples = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [0, 3]
    assert {s["agent"] for s in samples if s["step"] == 0} == {0, 1, 2}
    assert len({s["agent"] for s in samples if s["step"] == 3}) == 3  # the generation after step 2's evolution


def test_smoke_caps_bound_a_run(model_path, tokenizer, monkeypatch):
    monkeypatch.setenv("LLM_GYM_MAX_STEPS", "2")
    monkeypatch.setenv("LLM_GYM_MAX_OUTPUT_TOKENS", "3")
    pop = finetune_llm_reasoning(make_pop(model_path, tokenizer, 1), make_env(tokenizer), num_epochs=1,
                                 log_dir="run", verbose=False, eval_problems=2)  # fmt: skip
    assert pop[0].steps == 2 and pop[0].hps.max_output_tokens == 3 and len(pop[0].fitness) == 1
    monkeypatch.setenv("LLM_GYM_MAX_STEPS", "zero")
    with pytest.raises(ValueError, match="LLM_GYM_MAX_STEPS='zero' must be a positive integer"):
        finetune_llm_reasoning(pop, make_env(tokenizer), verbose=False)


def test_dynamic_sampling_refills_in_the_loop_and_logs_it(model_path, tokenizer):
    pop = make_pop(model_path, tokenizer, 2)
    for agent in pop:
        agent.set_hp("dynamic_sampling", True)
        agent.set_hp("max_refills", 2)
    env = make_env(tokenizer)
    finetune_llm_reasoning(pop, env, max_steps=3, evaluation_interval=3, log_dir="run", eval_problems=2,
                           verbose=False)  # fmt: skip
    metrics = read_csv_metrics("run/metrics.csv")
    refills = [v for slot in (0, 1) for _, v in metrics[f"agent{slot}/grpo/refills"]]
    assert len(refills) == 6 and all(r in (0.0, 1.0, 2.0) for r in refills) and sum(refills) > 0
    assert all(0.0 <= v <= 1.0 for _, v in metrics["agent0/grpo/frac_reward_zero_std"])
    assert all(1.0 <= v <= 2.0 or v == 0.0 for _, v in metrics["agent0/grpo/groups"])
    tokens = [v for _, v in metrics["agent0/completion/generated_tokens"]]
    assert len(tokens) == 3 and all(2 * 2 <= t <= 3 * 2 * 2 * 6 for t in tokens)  # 1-3 draws of 2 x 2, 1-6 tokens
    # Every refill consumed one more batch of 2 training problems, beside the 3 shared batches.
    assert env.state_dict()["position"]["train"] == 2 * 3 + 2 * int(sum(refills))


def _run(model_path, tokenizer, max_steps, resume=False):
    tournament, mutation = evolution(seed=1, size=2)
    return finetune_llm_reasoning(
        make_pop(model_path, tokenizer, 2), make_env(tokenizer), evo_steps=2, tournament=tournament,
        mutation=mutation, evaluation_interval=2, max_steps=max_steps, checkpoint_path="ckpt",
        resume_from="ckpt" if resume else None, log_dir="run", eval_problems=2, verbose=False,
    )  # fmt: skip


def test_resumed_run_reproduces_the_uninterrupted_run(model_path, tokenizer, tmp_path, monkeypatch):
    """Same seeds: 6 steps straight == 2 steps, then a fresh population resumed to 6, bit for bit.

    Exact equality holds because the checkpoint carries everything random: torch/numpy/python RNG
    states (sampling), the data position and epoch (the shuffle is seeded by (seed, epoch)), and
    the selection and mutation generators; greedy evaluation draws nothing.
    """
    straight = _run(model_path, tokenizer, 6)
    monkeypatch.chdir(tmp_path / "..")
    (tmp_path / "resumed").mkdir()
    monkeypatch.chdir(tmp_path / "resumed")
    _run(model_path, tokenizer, 2)
    resumed = _run(model_path, tokenizer, 6, resume=True)
    for a, b in zip(straight, resumed, strict=True):
        assert a.index == b.index and a.hps == b.hps and a.fitness == b.fitness and a.lineage == b.lineage
        assert all(torch.equal(x, y) for x, y in zip(adapter(a), adapter(b), strict=True))
    # The resumed run appended to the first run's CSV: each step logged exactly once.
    steps = [s for s, _ in read_csv_metrics("run/metrics.csv")["agent0/loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]


DRIVER = textwrap.dedent('''
    import os, signal, sys, time
    import torch
    torch.set_num_threads(1)
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from llm_gym.algorithms import Mutations, TournamentSelection, create_population, finetune_llm_reasoning
    from llm_gym.algorithms.grpo.agent import GRPO
    from llm_gym.reasoning_gym import ReasoningGym
    from test_training import GENES, length_reward

    model_path, mode, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tok = AutoTokenizer.from_pretrained(model_path)
    env = ReasoningGym.from_task("llm_gym/Countdown-v0", tok, train_size=64, test_size=4,
                                 data_batch_size_per_gpu=2, seed=0, reward_fn=length_reward)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    pop = create_population(2, model_name=model_path, pad_token_id=tok.pad_token_id, device="cpu", seed=0,
                            group_size=2, max_output_tokens=6, lr=1e-2, lora_config=lora)
    if mode == "slow":  # gives the parent time to kill us mid-run
        reset = env.reset
        env.reset = lambda *a, **k: (time.sleep(0.1), reset(*a, **k))[1]
    writes = []
    if mode == "die-mid-write":  # SIGKILL itself inside the 2nd checkpoint write, after agent_0's files
        write = GRPO.write_checkpoint
        def dying(self, directory):
            write(self, directory)
            if ".latest.tmp-" in str(directory):
                writes.append(directory)
                if len(writes) == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
        GRPO.write_checkpoint = dying
    if mode == "die-between-renames":  # SIGKILL itself after the old checkpoint moved aside
        rename = os.rename
        def dying_rename(src, dst):
            rename(src, dst)
            if os.path.basename(str(src)) == "latest" and ".latest.old-" in str(dst):
                os.kill(os.getpid(), signal.SIGKILL)
        os.rename = dying_rename
    finetune_llm_reasoning(
        pop, env, evo_steps=2, tournament=TournamentSelection(2, True, 2, rand_seed=1),
        mutation=Mutations(0.0, rl_hp=1.0, mutation_sd=0.5, rand_seed=1, hp_config=GENES),
        evaluation_interval=2, max_steps=max_steps, checkpoint_path="ckpt", elite_path="elites",
        log_dir="run", eval_problems=2, verbose=False,
    )
''')


def _driver(tmp_path, model_path, mode, max_steps):
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "driver.py", model_path, mode, str(max_steps)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def _check_against_files(pop, ckpt):
    """Agents loaded from a checkpoint hold exactly the files' adapters, optimizer states, hps and fitness."""
    for slot, agent in enumerate(pop):
        folder = ckpt / f"agent_{slot}"
        saved = load_file(str(folder / "adapter_model.safetensors"))
        mine = {n.replace(f".{agent.adapter_name}.", "."): p for n, p in agent.model.named_parameters()
                if f".{agent.adapter_name}." in n}  # fmt: skip
        assert sorted(mine) == sorted(saved) and all(torch.equal(mine[k], saved[k]) for k in saved)
        meta = json.loads((folder / "llm_gym_agent.json").read_text())
        assert agent.fitness == meta["fitness"] and agent.lineage == meta["lineage"]
        assert {k: getattr(agent.hps, k) for k in meta["hyperparameters"]} == meta["hyperparameters"]
        opt = torch.load(folder / "optimizer.pt")
        live = agent.optimizer.state_dict()
        assert len(opt["state"]) == len(live["state"]) == len(saved)
        for key, state in opt["state"].items():
            assert torch.equal(live["state"][key]["exp_avg_sq"], state["exp_avg_sq"])


def test_sigkill_mid_run_then_resume_loses_at_most_one_evolution_step(model_path, tokenizer, tmp_path):
    proc = _driver(tmp_path, model_path, "slow", 30)
    deadline = time.time() + 60
    last = 0
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "run" / "metrics.csv").exists():
            logged = read_csv_metrics(tmp_path / "run" / "metrics.csv").get("agent0/loss", [])
            last = logged[-1][0] if logged else 0
            if last >= 7:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    last = read_csv_metrics(tmp_path / "run" / "metrics.csv")["agent0/loss"][-1][0]  # steps fully done

    pop, env = make_pop(model_path, tokenizer, 2), make_env(tokenizer)
    state = load_population(tmp_path / "ckpt" / "latest", pop, env=env)
    saved_step = state["step"]
    assert saved_step % 2 == 0 and 0 <= last - saved_step <= 2  # at most one evolution step (2 steps) lost
    assert state["env"]["position"]["train"] == 2 * saved_step  # 2 prompts per step, no epoch wrap yet
    _check_against_files(pop, tmp_path / "ckpt" / "latest")

    os.chdir(tmp_path)  # the autouse fixture restores the cwd
    tournament, mutation = evolution(seed=1, size=2)
    final = finetune_llm_reasoning(
        make_pop(model_path, tokenizer, 2), make_env(tokenizer), evo_steps=2, tournament=tournament,
        mutation=mutation, evaluation_interval=2, max_steps=saved_step + 2, checkpoint_path="ckpt",
        resume_from="ckpt", elite_path="elites", eval_problems=2, verbose=False,
    )  # fmt: skip
    state = json.loads((tmp_path / "ckpt" / "latest" / "state.json").read_text())
    assert state["step"] == saved_step + 2 and state["env"]["position"]["train"] == 2 * (saved_step + 2)
    assert state["run_dir"] == "run"  # the resumed run logged into the same folder
    steps = [s for s, _ in read_csv_metrics(tmp_path / "run" / "metrics.csv")["agent0/loss"]]
    assert steps[-2:] == [saved_step + 1, saved_step + 2]
    assert all(a.steps >= saved_step + 2 for a in final)


@pytest.mark.parametrize("mode", ["die-mid-write", "die-between-renames"])
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(model_path, tokenizer, tmp_path, mode):
    proc = _driver(tmp_path, model_path, mode, 6)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    leftovers = [p.name for p in (tmp_path / "ckpt").iterdir() if p.name != "latest"]
    if mode == "die-mid-write":  # a half-written temporary folder next to the intact step-2 checkpoint
        assert len(leftovers) == 1 and leftovers[0].startswith(".latest.tmp-")
        assert not (tmp_path / "ckpt" / leftovers[0] / "agent_1").exists()
        assert (tmp_path / "ckpt" / "latest" / "state.json").is_file()
    else:  # the step-2 checkpoint was moved aside and the new one not yet renamed in
        assert not (tmp_path / "ckpt" / "latest").exists()
        assert len(leftovers) == 2 and {n.split("-")[0] for n in leftovers} == {".latest.old", ".latest.tmp"}

    pop = make_pop(model_path, tokenizer, 2)
    state = load_population(tmp_path / "ckpt" / "latest", pop)  # repairs, then loads
    assert state["step"] == 2
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["latest"]
    _check_against_files(pop, tmp_path / "ckpt" / "latest")
