"""Populations on one shared base model: memory, independence, evolution on real GRPO agents, checkpoints."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from grpo_tiny import single_thread
from peft import LoraConfig
from transformers import AutoTokenizer

from llm_gym.algorithms import HyperparameterConfig, Mutations, RLParameter, create_population
from llm_gym.algorithms.run.checkpoints import load_population, save_population
from llm_gym.reasoning_gym import ReasoningGym
from llm_gym.tiny import tiny_model_path

_one_thread = pytest.fixture(autouse=True)(single_thread)

# LoRA r=4 on every linear layer of the "tiny" preset (hidden 64, 4 heads of 16, 2 KV heads,
# SwiGLU 256, 2 layers); a LoRA pair on a (in -> out) layer has r * (in + out) parameters:
#   q 64->64: 512, k 64->32: 384, v 64->32: 384, o 64->64: 512, gate/up 64->256: 1280 each,
#   down 256->64: 1280  =>  5632 per layer, 11264 for 2 layers (all-linear excludes lm_head).
ADAPTER_PARAMS = 11264


def length_reward(completion, answer, question):
    """Rewards longer completions: varies within a group (uncapped, so ties are rare), so advantages are non-zero."""
    return len(completion) / 40


@pytest.fixture(scope="module")
def model_path():
    return str(tiny_model_path("tiny"))


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


def make_env(tokenizer, train_size=16):
    return ReasoningGym.from_task("llm_gym/Countdown-v0", tokenizer, train_size=train_size, test_size=4,
                                  data_batch_size_per_gpu=2, seed=0, reward_fn=length_reward)  # fmt: skip


def make_pop(model_path, tokenizer, size, **kwargs):
    options = dict(
        model_name=model_path, pad_token_id=tokenizer.pad_token_id, device="cpu", seed=0, group_size=2,
        max_output_tokens=6, lr=1e-2, beta=0.04,
        lora_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )  # fmt: skip
    options.update(kwargs)
    return create_population(size, **options)


def _adapter(agent):
    return {n: p.detach().clone() for n, p in agent.model.named_parameters() if f".{agent.adapter_name}." in n}


def _base(model):
    return {n: p for n, p in model.named_parameters() if "lora_" not in n}


def test_population_shares_one_base_and_adds_only_adapter_parameters(model_path, tokenizer):
    one = make_pop(model_path, tokenizer, 1)
    three = create_population(3, **dict(model_name=model_path, pad_token_id=tokenizer.pad_token_id, device="cpu",
                                      lora_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             task_type="CAUSAL_LM")))  # fmt: skip
    assert [a.index for a in three] == [0, 1, 2]
    assert [a.adapter_name for a in three] == ["agent0", "agent1", "agent2"]
    assert sum(p.numel() for p in _adapter(three[1]).values()) == ADAPTER_PARAMS
    total_one = sum(p.numel() for p in one[0].model.parameters())
    total_three = sum(p.numel() for p in three[0].model.parameters())
    assert total_three - total_one == 2 * ADAPTER_PARAMS  # two more agents = two adapters, no base copy
    base_ptrs = {n: p.data_ptr() for n, p in _base(three[0].model).items()}
    for agent in three[1:]:
        assert agent.model is three[0].model
        assert {n: p.data_ptr() for n, p in _base(agent.model).items()} == base_ptrs
        assert agent.optimizer is not three[0].optimizer
    # Each optimizer holds exactly its own adapter's tensors.
    own = {id(p) for p in three[2].model.parameters() if ".agent2." in _name_of(three[2].model, p)}
    assert {id(p) for g in three[2].optimizer.param_groups for p in g["params"]} == own


def _name_of(model, param):
    return next(n for n, p in model.named_parameters() if p is param)


def test_training_changes_every_adapter_and_never_the_base(model_path, tokenizer, tmp_path):
    from llm_gym.algorithms import finetune_llm_reasoning

    pop = make_pop(model_path, tokenizer, 2)
    base_before = {n: p.detach().clone() for n, p in _base(pop[0].model).items()}
    adapters_before = [_adapter(a) for a in pop]
    pop = finetune_llm_reasoning(pop, make_env(tokenizer), max_steps=2, evaluation_interval=2, evo_steps=None,
                                 log_dir=str(tmp_path / "run"), verbose=False)  # fmt: skip
    for name, param in _base(pop[0].model).items():
        assert torch.equal(param, base_before[name]), name
    for agent, before in zip(pop, adapters_before, strict=True):
        after = _adapter(agent)
        # lora_B starts at 0 and every one moved; every lora_A moved too (its gradient flows through B != 0
        # after the first step).
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        assert sorted(changed) == sorted(before), set(before) - set(changed)
        assert agent.steps == 2


def test_clones_are_independent(model_path, tokenizer):
    pop = make_pop(model_path, tokenizer, 2)
    with torch.no_grad():
        next(iter(p for n, p in pop[0].model.named_parameters() if ".agent0." in n)).add_(1.0)
    a0, a1 = _adapter(pop[0]), _adapter(pop[1])
    differ = [n for n in a1 if not torch.equal(a1[n], a0[n.replace(".agent1.", ".agent0.")])]
    assert len(differ) == 1  # only the tensor changed in agent0; agent1's copy is its own
    pop[1].set_hyperparameter("lr", 0.5)
    assert pop[0].hps.lr == 1e-2 and pop[1].optimizer.param_groups[0]["lr"] == 0.5


def test_mutations_change_clip_coef_and_group_size_on_real_agents(model_path, tokenizer):
    pop = make_pop(model_path, tokenizer, 2)
    genes = HyperparameterConfig(clip_coef=RLParameter(0.05, 0.5), group_size=RLParameter(2, 8, dtype=int))
    Mutations(no_mutation=0.0, rl_hp=1.0, mutation_sd=0.5, rand_seed=5, hp_config=genes).mutation(pop, True)
    # rand_seed=5 draws: agent 0 -> clip_coef, noise +0.2102 (0.2 * 1.2102 = 0.24204...);
    # agent 1 -> group_size, positive noise, so 2 moves up by one unit to 3 (replayed once by hand).
    clip_event, group_event = pop[0].lineage[-1], pop[1].lineage[-1]
    assert clip_event == {"step": 0, "event": "mutation", "agent": 0, "hp": "clip_coef", "old": 0.2,
                          "new": pytest.approx(0.24204452380655217, rel=1e-12)}  # fmt: skip
    assert pop[0].hps.clip_low == pop[0].hps.clip_high == clip_event["new"]
    assert group_event == {"step": 0, "event": "mutation", "agent": 1, "hp": "group_size", "old": 2, "new": 3}
    assert pop[1].hps.group_size == 3 and pop[0].hps.group_size == 2
    ids, _ = pop[1].get_action(make_env(tokenizer).reset())
    assert ids[0].shape[0] == 3  # the mutated group size is what the agent samples


def test_release_of_the_active_adapter_does_not_warn(model_path, tokenizer):
    pop = make_pop(model_path, tokenizer, 3)
    pop[2]._activate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pop[2].release()
    assert "agent2" not in pop[0].model.peft_config
    pop[1].get_action(make_env(tokenizer).reset(), training=False)  # the others still work


def test_save_and_load_population_round_trip(model_path, tokenizer, tmp_path):
    from safetensors.torch import load_file

    pop = make_pop(model_path, tokenizer, 2)
    env = make_env(tokenizer)
    prompts = env.reset()
    for agent in pop:  # one real update each, so optimizer states are non-empty
        ids, masks = agent.get_action(prompts)
        agent.learn((ids, masks, env.score(ids)))
        agent.fitness.append(0.25 * (agent.index + 1))
    pop[1].set_hyperparameter("beta", 0.125)
    pop[1].lineage.append({"step": 1, "event": "mutation", "agent": 1, "hp": "beta", "old": 0.04, "new": 0.125})
    path = save_population(tmp_path / "ckpt", pop, step=7, env=env, extra={"note": "x"})
    saved = json.loads((path / "state.json").read_text())
    assert saved["step"] == 7 and saved["note"] == "x" and saved["env"]["position"]["train"] == 2

    fresh = make_pop(model_path, tokenizer, 2)
    fresh_env = make_env(tokenizer)
    state = load_population(path, fresh, env=fresh_env)
    assert state["step"] == 7
    assert fresh_env.state_dict() == env.state_dict()
    for old, new in zip(pop, fresh, strict=True):
        file = load_file(str(path / f"agent_{old.index}" / "adapter_model.safetensors"))
        mine = _adapter(new)
        assert len(file) == len(mine) > 0
        for key, value in file.items():
            match = [n for n in mine if n.endswith(key.replace(".weight", f".{new.adapter_name}.weight"))]
            assert len(match) == 1 and torch.equal(mine[match[0]], value), key
        assert new.hps == old.hps and new.fitness == old.fitness and new.lineage == old.lineage
        assert new.optimizer.param_groups[0]["lr"] == old.hps.lr
        for s_old, s_new in zip(old.optimizer.state.values(), new.optimizer.state.values(), strict=True):
            assert torch.equal(s_old["exp_avg"], s_new["exp_avg"]) and torch.equal(s_old["step"], s_new["step"])
    with pytest.raises(ValueError, match="holds 2 agents but the population has 1"):
        load_population(path, make_pop(model_path, tokenizer, 1))
    with pytest.raises(FileNotFoundError, match="state.json is missing"):
        load_population(tmp_path / "nothing", fresh)


def test_create_population_rejects_size_zero():
    with pytest.raises(ValueError, match="at least one agent, got size=0"):
        create_population(0)
