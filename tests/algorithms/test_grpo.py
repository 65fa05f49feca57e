"""Tests for llm_gym.algorithms.grpo.agent on a tiny offline Qwen2 (CPU, one thread)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from grpo_tiny import EOS, lora_config, make_agent, make_model, prompt, single_thread
from peft import PeftModel

import llm_gym.algorithms.grpo.update as grpo_module
from llm_gym.algorithms import GRPO, VLLMConfig
from llm_gym.algorithms.rollout.completions import mini_batches, pack_completions

_one_thread = pytest.fixture(autouse=True)(single_thread)

MANY_EOS = list(range(0, 100, 7))  # 15 of 100 ids end a completion, so lengths vary
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def _prompts():
    return [prompt(p) for p in PROMPTS]


def _lora(agent):
    return {n: p.detach().clone() for n, p in agent.model.named_parameters() if f".{agent.adapter_name}." in n}


def _base(agent):
    return {n: p.detach().clone() for n, p in agent.model.named_parameters() if "lora_" not in n}


def _experience(agent, rewards=None):
    ids, masks = agent.get_action(_prompts())
    if rewards is None:  # distinct, non-constant rewards in every group
        rewards = torch.arange(len(PROMPTS) * agent.group_size, dtype=torch.float32).reshape(len(PROMPTS), -1) % 3
    return ids, masks, rewards


class _ForwardCounter:
    """Counts passes over the completions (policy, reference and old passes alike).

    With the prompt forward shared across a group (the default) a pass is two calls of the inner
    transformer: the prompts alone into an empty KV cache, then the completions on top of it. Only
    the second is counted, so one pass counts once either way.
    """

    def __init__(self, agent):
        self.calls = 0
        inner = agent.model.get_base_model()
        self.handle = inner.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None or cache.get_seq_length() > 0:
            self.calls += 1


# ------------------------------------------------------------------------------- validation
def test_group_size_below_two_is_refused():
    with pytest.raises(ValueError, match=r"group_size=1: GRPO needs at least 2 completions per prompt"):
        make_agent(group_size=1)


def test_bad_loss_type_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown loss_type 'ppo'; valid loss types are \['grpo', 'dr_grpo', 'dapo'\]"):
        make_agent(loss_type="ppo")


def test_missing_or_bad_pad_token_id():
    with pytest.raises(ValueError, match="pad_token_id is None.*tokenizer.pad_token = tokenizer.eos_token"):
        make_agent(pad_token_id=None)
    with pytest.raises(ValueError, match=r"pad_token_id=100 is outside the model's vocabulary \[0, 100\)"):
        make_agent(pad_token_id=100)


def test_missing_model_is_refused():
    with pytest.raises(ValueError, match="give model_name"):
        GRPO(pad_token_id=0)


def test_use_vllm_without_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "llm-gym\[vllm\]" on a machine with a CUDA GPU'):
        make_agent(use_vllm=True, vllm_config=VLLMConfig(sleep_mode=True, max_num_seqs=4))


def test_model_object_accepted_as_actor_network_and_only_lora_trainable():
    agent = GRPO(actor_network=make_model(), pad_token_id=EOS, lora_config=lora_config(), group_size=2)
    trainable = {n for n, p in agent.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ".default." in n for n in trainable)
    assert sum(p.numel() for g in agent.optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for n, p in agent.model.named_parameters() if n in trainable
    )


def test_clip_coef_pair_and_mutation_updates_optimizer():
    agent = make_agent(clip_coef=(0.2, 0.28))
    assert (agent.hps.clip_low, agent.hps.clip_high) == (0.2, 0.28)
    agent.lr = 3e-4
    assert [g["lr"] for g in agent.optimizer.param_groups] == [3e-4]
    with pytest.raises(ValueError, match="unknown hyper-parameter 'gamma'"):
        agent.set_hyperparameter("gamma", 0.9)
    with pytest.raises(ValueError, match="group_size=1"):
        agent.group_size = 1
    assert agent.group_size == 4  # the bad value was not kept


# -------------------------------------------------------------------------------- get_action
def test_get_action_shapes_and_masks_one_prefill_for_all_prompts():
    agent = make_agent(eos_token_id=MANY_EOS, group_size=3, max_output_tokens=8)
    shapes = []
    inner = agent.model.get_base_model().model
    hook = inner.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        ids, masks = agent.get_action(_prompts())
    finally:
        hook.remove()
    assert shapes[0] == (3, 4)  # one prefill of all P prompts, left-padded (not P x G rows)
    assert all(s[1] == 1 for s in shapes[1:])  # then one token per live row per step
    assert len(ids) == len(masks) == 3
    lengths = set()
    for row_ids, row_mask, p in zip(ids, masks, PROMPTS, strict=True):
        assert row_ids.shape[0] == 3 and row_mask.shape == (3, row_ids.shape[1] - 1) and row_mask.dtype == torch.bool
        assert row_ids[:, : len(p)].tolist() == [p] * 3
        for seq, m in zip(row_ids, row_mask, strict=True):
            gen = seq[len(p) :].tolist()
            stop = next((j + 1 for j, t in enumerate(gen) if t in MANY_EOS), len(gen))
            assert m.tolist() == [False] * (len(p) - 1) + [j < stop for j in range(len(gen))]
            lengths.add(stop)
    assert len(lengths) > 1  # the check saw completions of different lengths


def test_greedy_evaluation_is_deterministic_with_one_completion():
    agent = make_agent()
    first, _ = agent.get_action(_prompts(), training=False)
    torch.manual_seed(99)
    second, _ = agent.get_action(_prompts(), training=False)
    assert all(a.shape[0] == 1 and torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_generation_budget_is_cut_to_max_model_len(caplog):
    agent = make_agent(max_model_len=6, max_output_tokens=10)
    ids, _ = agent.get_action(_prompts())
    # longest prompt has 4 tokens: at most 6 - 4 = 2 new tokens for every prompt of the batch
    assert [t.shape[1] - len(p) for t, p in zip(ids, PROMPTS, strict=True)] <= [2, 2, 2]
    assert "generating at most 2 tokens" in caplog.text
    too_long = make_agent(max_model_len=4)
    with pytest.raises(ValueError, match="a prompt of 4 tokens leaves no room"):
        too_long.get_action(_prompts())


# ------------------------------------------------------------------------------------- learn
def test_learn_changes_every_lora_parameter_and_no_base_parameter():
    agent = make_agent()
    lora0, base0 = _lora(agent), _base(agent)
    for _ in range(3):  # lora_B starts at 0, so lora_A moves from the second step on
        metrics = agent.learn(_experience(agent))
    lora1, base1 = _lora(agent), _base(agent)
    unchanged = [n for n in lora0 if torch.equal(lora0[n], lora1[n])]
    assert not unchanged, f"LoRA parameters that never changed: {unchanged}"
    assert all(torch.equal(base0[n], base1[n]) for n in base0)
    for key in ("loss", "loss/policy", "loss/kl", "grpo/clip_fraction", "grpo/frac_reward_zero_std", "grpo/entropy",
                "completion/length_mean", "reward/mean", "grad_norm", "grpo/skipped_updates"):  # fmt: skip
        assert key in metrics
    assert metrics["loss/kl"] > 0 and metrics["grpo/skipped_updates"] == 0 and agent.steps == 3
    # rewards are (0, 1, 2, 0 | 1, 2, 0, 1 | 2, 0, 1, 2) % 3: no constant group; mean = 12/12
    assert metrics["grpo/frac_reward_zero_std"] == 0.0 and metrics["reward/mean"] == pytest.approx(1.0)
    assert 0 < metrics["grpo/entropy"] <= torch.log(torch.tensor(100.0)).item() + 1e-6


def test_reference_log_probs_are_the_base_model_with_adapters_disabled():
    base_copy = make_model()  # the same seed gives the same base weights
    agent = make_agent()
    for _ in range(2):
        ids, masks, rewards = _experience(agent)
        agent.learn((ids, masks, rewards))
    batches = mini_batches(pack_completions(ids, masks, agent.group_size, EOS), 64)
    ref = agent._frozen_logps(batches, reference=True)[0]
    policy = agent._frozen_logps(batches, reference=False)[0]
    mb = batches[0]
    with torch.no_grad():
        logits = base_copy(input_ids=mb.ids, attention_mask=mb.attention).logits[:, mb.first : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, mb.ids[:, mb.first + 1 :, None])[..., 0]
    m = mb.mask
    assert torch.allclose(ref[m], expected[m], atol=1e-5)
    assert (policy[m] - expected[m]).abs().max() > 1e-3  # the trained adapter does differ from the base


@pytest.mark.parametrize(
    ("beta", "epochs", "expected"),
    [(0.0, 1, 1), (0.04, 1, 2), (0.0, 2, 3), (0.04, 2, 4)],
    # forwards = ref (beta > 0) + old (epochs > 1) + one policy pass per epoch, one mini-batch each
)
def test_forward_passes_per_learn(beta, epochs, expected):
    agent = make_agent(beta=beta, update_epochs=epochs)
    experience = _experience(agent)
    counter = _ForwardCounter(agent)
    metrics = agent.learn(experience)
    assert counter.calls == expected
    if beta == 0:
        assert metrics["loss/kl"] == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_mini_batches_accumulate_to_the_full_batch_update(loss_type):
    full = make_agent(loss_type=loss_type, batch_size=64)
    experience = _experience(full)
    split = make_agent(loss_type=loss_type, batch_size=5)  # 12 sequences -> 5 + 5 + 2
    counter = _ForwardCounter(split)
    m_full = full.learn(experience)
    m_split = split.learn(experience)
    assert counter.calls == 3 * 2  # 3 mini-batches x (policy + reference)
    a, b = _lora(full), _lora(split)
    assert all(torch.allclose(a[n], b[n], atol=1e-5) for n in a)
    assert m_split["loss"] == pytest.approx(m_full["loss"], abs=1e-6)
    assert m_split["loss/kl"] == pytest.approx(m_full["loss/kl"], abs=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_beta_zero_skips_tied_groups_without_changing_the_update(loss_type):
    # Prompt 1's group ties (all rewards 1): its advantages are 0, so with beta = 0 its rows carry no
    # gradient and are not forwarded. The reference agent has a KL term (beta = 1e-12) so it trains on
    # every row; at the start policy == reference, where k3's gradient is exactly 0, so both updates
    # must agree.
    skip = make_agent(loss_type=loss_type, beta=0.0)
    full = make_agent(loss_type=loss_type, beta=1e-12)
    ids, masks, _ = _experience(skip)
    rewards = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    rows = []
    inner = skip.model.get_base_model().model
    hook = inner.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        m_skip = skip.learn((ids, masks, rewards))
    finally:
        hook.remove()
    m_full = full.learn((ids, masks, rewards))
    # One policy pass over the 2 x 4 rows with a signal (their 2 prompts once, then the 8 completions
    # on the shared prompt cache); no reference pass.
    assert rows == [2, 8]
    assert m_skip["grpo/trained_fraction"] == pytest.approx(2 / 3)
    assert m_full["grpo/trained_fraction"] == 1.0
    a, b = _lora(skip), _lora(full)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    assert m_skip["loss"] == pytest.approx(m_full["loss"], abs=1e-6)
    assert m_skip["completion/length_mean"] == m_full["completion/length_mean"]


def test_beta_zero_and_every_group_tied_leaves_the_adapter_alone():
    agent = make_agent(beta=0.0)
    ids, masks, _ = _experience(agent)
    before = _lora(agent)
    metrics = agent.learn((ids, masks, torch.ones(3, 4)))
    assert metrics["grpo/trained_fraction"] == 0.0 and metrics["loss"] == 0.0
    assert all(torch.equal(before[n], p) for n, p in _lora(agent).items())


def test_non_finite_loss_skips_the_update_with_a_warning(monkeypatch):
    agent = make_agent()
    experience = _experience(agent)
    lora0 = _lora(agent)
    real = grpo_module.grpo_loss

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan"))

    monkeypatch.setattr(grpo_module, "grpo_loss", nan_loss)
    with pytest.warns(RuntimeWarning, match="GRPO update skipped at step 0 .*non-finite loss"):
        metrics = agent.learn(experience)
    assert metrics["grpo/skipped_updates"] == 1.0 and agent.skipped_updates == 1
    assert all(torch.equal(lora0[n], p) for n, p in _lora(agent).items())


def test_learn_rejects_mismatched_rewards():
    agent = make_agent()
    ids, masks, _ = _experience(agent)
    with pytest.raises(ValueError, match=r"rewards must be \[P, G\] with P = 3 prompts, got shape \(2, 4\)"):
        agent.learn((ids, masks, torch.zeros(2, 4)))


def test_grpo_raises_reward_of_a_toy_task():
    # Reward: share of generated tokens (up to EOS) equal to token 42. The model is initialised
    # with std 0.2 (not 0.02) so that its tied embeddings can express a peaked distribution at
    # all; LoRA on the linear layers then has to learn to emit 42. Measured on this seed: mean
    # reward 0.01 -> 0.9 in 30 updates (~3 s).
    torch.manual_seed(0)
    agent = make_agent(make_model(init_std=0.2), group_size=8, max_output_tokens=6, lr=1e-2, beta=0.0)
    prompts = [prompt([5, 6, 7]), prompt([8, 9]), prompt([10, 11, 12, 13]), prompt([20])]

    def rewards_of(ids, masks):
        rows = []
        for seq, m in zip(ids, masks, strict=True):
            gen = seq[:, 1:]  # token t + 1 is generated where mask[t]
            rows.append(((gen == 42) & m).sum(1).float() / m.sum(1).clamp(min=1))
        return torch.stack(rows)

    means = []
    for _ in range(30):
        ids, masks = agent.get_action(prompts)
        rewards = rewards_of(ids, masks)
        means.append(rewards.mean().item())
        agent.learn((ids, masks, rewards))
    first, last = sum(means[:3]) / 3, sum(means[-3:]) / 3
    assert first < 0.1 and last > 0.6, [round(m, 2) for m in means]


# ------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_gives_identical_log_probs(tmp_path):
    agent = make_agent()
    for _ in range(2):
        experience = _experience(agent)
        agent.learn(experience)
    agent.fitness.append(0.5)
    agent.save_checkpoint(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "llm_gym_agent.json", "optimizer.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
    meta = json.loads((tmp_path / "ckpt" / "llm_gym_agent.json").read_text())
    assert meta["steps"] == 2 and meta["fitness"] == [0.5] and meta["hyperparameters"]["lr"] == 1e-2

    batches = mini_batches(pack_completions(experience[0], experience[1], agent.group_size, EOS), 64)
    expected = agent._frozen_logps(batches, reference=False)[0]

    fresh = make_agent(lr=1e-3)
    fresh.load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(fresh._frozen_logps(batches, reference=False)[0], expected)
    assert fresh.steps == 2 and fresh.fitness == [0.5] and fresh.lr == 1e-2
    assert fresh.optimizer.param_groups[0]["lr"] == 1e-2
    s0, s1 = agent.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k]["exp_avg"], s1[k]["exp_avg"]) for k in s0)

    # a plain PEFT adapter: PeftModel.from_pretrained on a fresh base gives the same log-probs
    peft_model = PeftModel.from_pretrained(make_model(), str(tmp_path / "ckpt")).eval()
    mb = batches[0]
    with torch.no_grad():
        logits = peft_model(input_ids=mb.ids, attention_mask=mb.attention).logits[:, mb.first : -1]
        logp = torch.log_softmax(logits, -1).gather(-1, mb.ids[:, mb.first + 1 :, None])[..., 0]
    # Compared on the completion tokens: the only log-probs the update computes (and reads).
    assert torch.allclose(logp[mb.mask], expected[mb.mask], atol=1e-5)

    agent.save_checkpoint(tmp_path / "ckpt")  # overwriting an existing checkpoint works
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_load_checkpoint_with_another_rank_is_refused(tmp_path):
    make_agent().save_checkpoint(tmp_path / "c")
    with pytest.raises(ValueError, match="has r=4 but this agent's adapter has r=8"):
        make_agent(lora_config=lora_config(r=8)).load_checkpoint(tmp_path / "c")


# ---------------------------------------------------------------------------------- clone
def test_clone_shares_the_base_copies_the_adapter_then_diverges():
    agent = make_agent()
    agent.learn(_experience(agent))
    base0 = _base(agent)
    twin = agent.clone(adapter_name="twin")
    assert twin.model is agent.model and twin.adapter_name == "twin"
    a, b = _lora(agent), _lora(twin)
    assert len(a) == len(b) and all(torch.equal(a[n], b[n.replace(".default.", ".twin.")]) for n in a)
    s0, s1 = agent.optimizer.state_dict()["state"], twin.optimizer.state_dict()["state"]
    assert all(torch.equal(s0[k]["exp_avg"], s1[k]["exp_avg"]) for k in s0)
    assert all(s0[k]["exp_avg"].data_ptr() != s1[k]["exp_avg"].data_ptr() for k in s0)  # copied, not shared

    twin.lr = 5e-2
    assert agent.lr == 1e-2
    for _ in range(2):
        twin.learn(_experience(twin))
    a2, b2 = _lora(agent), _lora(twin)
    assert all(torch.equal(a[n], a2[n]) for n in a)  # training the clone leaves the original alone
    assert all(not torch.equal(a[n], b2[n.replace(".default.", ".twin.")]) for n in a)
    assert all(torch.equal(base0[n], p) for n, p in _base(agent).items())
    with pytest.raises(ValueError, match="'twin' is already used"):
        agent.clone(adapter_name="twin")
    # each agent generates with its own adapter
    agent.get_action(_prompts(), training=False)
    assert agent.model.active_adapter == "default"
    twin.get_action(_prompts(), training=False)
    assert twin.model.active_adapter == "twin"
    agent.learn(_experience(agent))
    assert all(torch.equal(b2[n], p) for n, p in _lora(twin).items())


def test_a_clone_checkpoint_loads_into_a_default_adapter(tmp_path):
    agent = make_agent()
    twin = agent.clone(adapter_name="twin")
    twin.learn(_experience(twin))
    twin.save_checkpoint(tmp_path / "twin")
    fresh = make_agent()
    fresh.load_checkpoint(tmp_path / "twin")
    mine, theirs = _lora(fresh), _lora(twin)
    assert all(torch.equal(p, theirs[n.replace(".default.", ".twin.")]) for n, p in mine.items())


def test_population_protocol_index_lineage_and_release():
    agent = make_agent(index=3)
    agent.lineage.append({"event": "start", "agent": 3})
    child = agent.clone(index=7)
    assert (child.index, child.adapter_name) == (7, "agent7")
    assert child.lineage == agent.lineage and child.lineage is not agent.lineage
    assert child.hps is not agent.hps and child.clip_coef == 0.2
    child.set_hp("clip_coef", 0.3)
    assert (child.hps.clip_low, child.hps.clip_high) == (0.3, 0.3) and agent.clip_coef == 0.2
    child.release()
    assert "agent7" not in agent.model.peft_config
    agent.learn(_experience(agent))  # the remaining agent still trains


# ------------------------------------------------------------------------------- config
def test_keywords_build_the_frozen_config_and_unknown_ones_are_refused():
    import dataclasses

    from llm_gym.algorithms.grpo.config import GRPOConfig

    agent = make_agent(lr=3e-3, clip_coef=(0.1, 0.3), max_model_len=64)
    assert agent.hps == GRPOConfig(lr=3e-3, clip_low=0.1, clip_high=0.3, max_model_len=64, batch_size=64,
                                   group_size=4, max_output_tokens=6)  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        agent.hps.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"unknown hyper-parameter 'learning_rate'; valid names are \['lr', 'beta'"):
        make_agent(learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"lr=0\.0 is invalid: it must be > 0; e\.g\. lr=5e-05 \(the default\)"):
        GRPOConfig(lr=0.0)
    with pytest.raises(ValueError, match=r"max_model_len=1 must be >= 2"):
        GRPOConfig(max_model_len=1)
    with pytest.raises(ValueError, match=r"unknown backend 'sglang'; valid backends are \['hf', 'vllm', 'vllm-server'\]"):
        make_agent(backend="sglang")


def test_a_config_object_and_keywords_combine():
    from llm_gym.algorithms.grpo.config import GRPOConfig

    base = GRPOConfig(lr=1e-3, group_size=2, beta=0.0)
    agent = make_agent(config=base, group_size=3)
    assert (agent.hps.lr, agent.hps.group_size, agent.hps.beta) == (1e-2, 3, 0.0)  # make_agent's lr=1e-2 wins
    assert base.group_size == 2  # the given config is not changed


def test_use_vllm_is_backend_vllm_and_fixed_settings_stay_fixed(tmp_path):
    with pytest.raises(ValueError, match="use_vllm=True contradicts backend='hf'"):
        make_agent(use_vllm=True, backend="hf")
    agent = make_agent(max_model_len=32)
    assert agent.hps.backend == "hf" and not agent.use_vllm and agent.max_model_len == 32
    with pytest.raises(ValueError, match="max_model_len is fixed when the agent is built"):
        agent.set_hp("max_model_len", 64)
    agent.save_checkpoint(tmp_path / "c")
    other = make_agent(max_model_len=48, lr=1e-3)
    other.load_checkpoint(tmp_path / "c")
    assert other.max_model_len == 48 and other.lr == 1e-2  # genes come from the file, fixed settings stay


def test_get_hp_reads_genes_and_refuses_unknown_names():
    agent = make_agent(clip_coef=(0.2, 0.28))
    assert agent.get_hp("lr") == 1e-2 and agent.get_hp("clip_coef") == (0.2, 0.28)
    with pytest.raises(KeyError, match="unknown hyper-parameter 'gamma'"):
        agent.get_hp("gamma")
    assert agent.mut == "None"


def test_backends_by_name():
    from llm_gym.algorithms.rollout.backend import BACKENDS, check_backend, make_backend
    from llm_gym.algorithms.rollout.hf import HFGenerationBackend

    assert sorted(BACKENDS) == ["hf", "vllm", "vllm-server"]
    agent = make_agent()
    backend = make_backend("hf", agent, {"use_generate": True})
    assert isinstance(backend, HFGenerationBackend) and backend.use_generate and backend.model is agent.model
    with pytest.raises(ValueError, match=r"unknown backend 'tgi'; valid backends are \['hf', 'vllm', 'vllm-server'\]"):
        check_backend("tgi")


def test_hf_backend_phases_are_no_ops_and_learn_starts_each_learn_phase(monkeypatch):
    from llm_gym.algorithms.rollout.backend import GenerationBackend
    from llm_gym.algorithms.rollout.hf import HFGenerationBackend

    agent = make_agent(group_size=2)
    assert isinstance(agent.backend, GenerationBackend)  # the protocol's generate/sync/sleep/close
    assert agent.backend.sleep() is None and agent.backend.close() is None
    calls = []
    monkeypatch.setattr(HFGenerationBackend, "sleep", lambda self: calls.append(self))
    experience = _experience(agent)
    agent.learn(experience)
    agent.learn(experience)
    assert calls == [agent.backend, agent.backend]  # one sleep per learn phase, none per generation
    agent.close()
    agent.close()  # idempotent, and the HF agent keeps generating
    first = agent.get_action(_prompts(), training=False)[0]
    assert [t.tolist() for t in first] == [t.tolist() for t in agent.get_action(_prompts(), training=False)[0]]


def test_each_loss_variant_shares_a_batch_exactly_once():
    from llm_gym.algorithms.grpo.loss import LOSS_TYPES, LOSS_VARIANTS

    assert tuple(LOSS_VARIANTS) == LOSS_TYPES
    rows, tokens = [5, 5, 2], [17, 9, 4]  # a 12-row batch of 30 completion tokens in three mini-batches
    for name, variant in LOSS_VARIANTS.items():
        shares = [variant.batch_share(r, t, 12, 30) for r, t in zip(rows, tokens, strict=True)]
        assert sum(shares) == pytest.approx(1.0), name
    assert LOSS_VARIANTS["dapo"].batch_share(5, 17, 12, 30) == pytest.approx(17 / 30)  # by tokens
    assert LOSS_VARIANTS["grpo"].batch_share(5, 17, 12, 30) == pytest.approx(5 / 12)  # by sequences
