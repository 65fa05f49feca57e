"""SFT warm-up: data building, masking, the length report, schedules and real training."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from llm_gym.algorithms.sft import (
    IGNORE_INDEX,
    SFTConfig,
    SFTExample,
    collate,
    completion_loss,
    filter_rollouts,
    length_report,
    oracle_examples,
    tokenize_example,
    train_sft,
)
from llm_gym.tasks.countdown import TASK as COUNTDOWN
from llm_gym.tiny import TinyConfig, build_model, build_tokenizer

CORPUS = [
    "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>\n",
    "<|im_start|>user\nCount<|im_end|>\n<|im_start|>assistant\n1 2 3 4 5<|im_end|>\n",
    "Using the numbers [44, 19, 35], create an equation. <think> </think> <answer> </answer>",
] * 10
MICRO = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, vocab_size=300)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: with 2 threads on a busy 2-core machine a step is ~25x slower than with one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=300)


class CharTokenizer:
    """One token per character (its code point); eos id 0. Lengths are then easy to derive by hand."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def prompt_of(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------------------------------ data
def test_tokenize_example_appends_eos_once(tokenizer):
    prompt_ids, completion_ids = tokenize_example(SFTExample(prompt_of("Say hi"), "hello there"), tokenizer)
    assert completion_ids[-1] == tokenizer.eos_token_id == 2
    assert tokenizer.decode(prompt_ids) == prompt_of("Say hi")
    assert tokenizer.decode(completion_ids) == "hello there<|im_end|>"
    _, again = tokenize_example(SFTExample("x", "hello there<|im_end|>"), tokenizer)
    assert again == completion_ids  # already ends with eos: not doubled


def test_collate_masks_prompt_and_padding_exactly():
    pairs = [([5, 6, 7], [8, 9]), ([5], [8, 9, 10, 11]), ([5, 6], [8])]
    batch, truncated = collate(pairs, pad_id=0, seq_len=10)
    assert truncated == 0
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 11], [5, 6, 8, 0, 0]]
    assert batch["labels"].tolist() == [
        [-100, -100, -100, 8, 9],
        [-100, 8, 9, 10, 11],
        [-100, -100, 8, -100, -100],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_collate_truncates_the_tail_and_counts():
    batch, truncated = collate([([5, 6, 7], [8, 9]), ([5], [8])], pad_id=0, seq_len=4)
    assert truncated == 1
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8], [-100, 8, -100, -100]]


def test_completion_loss_scores_only_labelled_positions():
    # V=2. Position 0 predicts the label at position 1 (token 1) with logits [0, ln 3]: p = 3/4.
    # Position 1 predicts position 2, whose label is -100: its logits must not matter.
    logits = torch.tensor([[[0.0, math.log(3.0)], [50.0, -50.0], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]])
    assert completion_loss(logits, labels).item() == pytest.approx(-math.log(0.75), abs=1e-6)


def test_length_report_numbers():
    # lengths = prompt + completion + eos: 2+1+1=4, 3+2+1=6, 1+0+1=2, 4+4+1=9
    examples = [SFTExample("ab", "c"), SFTExample("abc", "de"), SFTExample("a", ""), SFTExample("abcd", "efgh")]
    report = length_report(examples, CharTokenizer(), seq_len=6)
    assert (report.count, report.max_length, report.fit) == (4, 9, 3)
    assert report.mean_length == pytest.approx(21 / 4)
    assert report.fit_fraction == pytest.approx(0.75)


def test_filter_rollouts_by_total_and_by_parts():
    prompts, completions = ["p1", "p2", "p3"], ["c1", "c2", "c3"]
    kept = filter_rollouts(prompts, completions, [0.5, 1.0, 2.0], threshold=1.0)
    assert [e.completion for e in kept] == ["c2", "c3"]
    parts = [{"format": 1.0, "equation": 0.0}, {"format": 1.0, "equation": 1.0}, {"format": 0.0, "equation": 1.0}]
    assert [e.prompt for e in filter_rollouts(prompts, completions, parts, 1.0)] == ["p1", "p2", "p3"]  # sums 1, 2, 1
    assert [e.prompt for e in filter_rollouts(prompts, completions, parts, {"format": 1, "equation": 1})] == ["p2"]
    with pytest.raises(ValueError, match="lengths 3, 3, 2"):
        filter_rollouts(prompts, completions, [1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="part 'win'"):
        filter_rollouts(prompts, completions, parts, {"win": 1.0})


def test_oracle_examples_follow_the_prefill(tokenizer):
    task = COUNTDOWN
    examples = oracle_examples(task, tokenizer, size=5, seed=3, max_numbers=3)
    assert len(examples) == 5
    for ex in examples:
        assert ex.prompt.endswith("<|im_start|>assistant\nLet me solve this step by step.\n<think>")
        assert ex.completion.endswith("</answer>")
    no_oracle = dataclasses.replace(task, solve=None)
    with pytest.raises(ValueError, match="has no oracle"):
        oracle_examples(no_oracle, tokenizer, size=2)


# ------------------------------------------------------------------------------------------ config
def test_schedule_warmup_then_cosine():
    cfg = SFTConfig(lr=1.0, warmup_steps=2, schedule="cosine")
    # warm-up: (step+1)/2; then cosine over the remaining 4 steps: progress 0, 1/4, 1/2, 3/4
    got = [cfg.lr_at(s, total=6) for s in range(6)]
    want = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    assert got == pytest.approx(want, abs=1e-12)
    assert SFTConfig(lr=0.1, schedule="constant").lr_at(99, total=100) == 0.1
    assert SFTConfig(batch_size=4, epochs=2).total_steps(10) == 5  # ceil(2 * 10 / 4)
    assert SFTConfig(max_steps=7).total_steps(10) == 7


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="schedule='step' is unknown"):
        SFTConfig(schedule="step")
    with pytest.raises(ValueError, match="batch_size=0 must be positive"):
        SFTConfig(batch_size=0)
    with pytest.raises(ValueError, match="max_steps=0"):
        SFTConfig(max_steps=0)


# ------------------------------------------------------------------------------------------ training
def test_loss_decreases_and_greedy_output_matches(tokenizer):
    examples = [SFTExample(prompt_of("Say hi"), "hello there"), SFTExample(prompt_of("Count"), "1 2 3 4 5")]
    model = build_model(tokenizer, MICRO, seed=0)
    steps = []
    result = train_sft(
        model, tokenizer, examples,
        SFTConfig(lr=1e-2, batch_size=2, max_steps=60, warmup_steps=5, schedule="constant"),
        callback=lambda step, loss: steps.append(step),
    )
    assert result.steps == 60 and steps == list(range(60)) and len(result.losses) == 60
    assert result.losses[0] > math.log(len(tokenizer)) - 1.0  # starts near chance: ln V = ln 300 ~ 5.7
    assert sum(result.losses[-5:]) / 5 < 0.05
    # completion tokens: every step sees both examples; the label count excludes the first position
    per_step = sum(len(tokenize_example(ex, tokenizer)[1]) for ex in examples)
    assert result.tokens == 60 * per_step
    assert not model.training
    for ex in examples:
        enc = tokenizer(ex.prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
        new = out[0, enc.input_ids.shape[1] :].tolist()
        assert new[-1] == tokenizer.eos_token_id  # learned to stop
        assert tokenizer.decode(new, skip_special_tokens=True) == ex.completion


def test_train_sft_on_a_peft_model_changes_only_adapters(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = build_model(tokenizer, MICRO, seed=0)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    result = train_sft(
        peft_model, tokenizer, [SFTExample(prompt_of("Say hi"), "hello there")], SFTConfig(lr=1e-2, max_steps=3)
    )
    assert result.steps == 3
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, lora_before[name]), f"{name} did not change"
    frozen = {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): param
        for name, param in peft_model.named_parameters()
        if not param.requires_grad
    }
    assert set(frozen) == set(base_before)
    for name, param in frozen.items():
        assert torch.equal(param, base_before[name]), name


def test_truncation_is_counted(tokenizer, caplog):
    model = build_model(tokenizer, MICRO, seed=0)
    examples = [SFTExample(prompt_of("Say hi"), "hello there")]
    n = sum(map(len, tokenize_example(examples[0], tokenizer)))
    with caplog.at_level("WARNING"):
        result = train_sft(model, tokenizer, examples, SFTConfig(max_steps=2, batch_size=1, seq_len=n - 1))
    assert result.truncated == 2
    assert "2 sequences were longer than seq_len" in caplog.text


def test_train_sft_rejects_empty_data(tokenizer):
    with pytest.raises(ValueError, match="no examples"):
        train_sft(build_model(tokenizer, MICRO), tokenizer, [])


# ------------------------------------------------------------------------------------------ band stop
def test_band_stop_stops_at_the_first_check_in_the_band(tokenizer):
    from llm_gym.algorithms.sft import BandStop

    scores = iter([0.02, 0.05, 0.12, 0.30])  # checks after steps 2, 4, 6, 8
    stop = BandStop(lambda: next(scores), low=0.10, high=0.50, every=2)
    model = build_model(tokenizer, MICRO, seed=0)
    examples = [SFTExample(prompt_of("Say hi"), "hello there")]
    result = train_sft(model, tokenizer, examples, SFTConfig(lr=1e-2, batch_size=1, max_steps=20), callback=stop)
    assert result.steps == 6 and len(result.losses) == 6 and result.stopped_early
    assert stop.history == [(2, 0.02), (4, 0.05), (6, 0.12)]
    assert not model.training


def test_band_stop_never_reached_runs_to_the_cap(tokenizer, caplog):
    from llm_gym.algorithms.sft import BandStop

    stop = BandStop(lambda: 0.0, low=0.10, high=0.50, every=3)
    result = train_sft(build_model(tokenizer, MICRO, seed=0), tokenizer, [SFTExample(prompt_of("Count"), "1 2")],
                       SFTConfig(lr=1e-2, batch_size=1, max_steps=7), callback=stop)
    assert result.steps == 7 and not result.stopped_early
    assert [step for step, _ in stop.history] == [3, 6]
    overshoot = BandStop(lambda: 0.9, low=0.10, high=0.50, every=1)
    with caplog.at_level("WARNING"):
        assert overshoot(0, 1.0) is True
    assert "overshot the band: score 0.900 > 0.50 at step 1" in caplog.text


def test_band_stop_rejects_a_bad_band():
    from llm_gym.algorithms.sft import BandStop

    with pytest.raises(ValueError, match="low=0.6, high=0.2"):
        BandStop(lambda: 0.0, low=0.6, high=0.2, every=1)
    with pytest.raises(ValueError, match="every=0"):
        BandStop(lambda: 0.0, low=0.1, high=0.2, every=0)


def test_oracle_examples_take_a_teacher(tokenizer):
    from llm_gym.tasks.countdown_teacher import WeakTeacher

    teacher = WeakTeacher({"last_step": 1.0})
    examples = oracle_examples(COUNTDOWN, tokenizer, size=5, seed=0, solver=teacher, min_numbers=3, max_numbers=3)
    oracle = oracle_examples(COUNTDOWN, tokenizer, size=5, seed=0, min_numbers=3, max_numbers=3)
    assert [e.prompt for e in examples] == [e.prompt for e in oracle]
    assert teacher.applied == {"last_step": 5} and teacher.calls == 5
    for ex, ref in zip(examples, oracle):
        trace = ref.completion.split(" </think>")[0].strip()
        a, op, b = __import__("re").match(r"(\d+)([-+*/])(\d+)=", trace.split(", ")[-1]).groups()
        assert ex.completion == f" {trace} </think>\n<answer>{a} {op} {b}</answer>"


def test_labelled_loss_runs_the_head_on_the_scored_window_only_and_matches_the_full_pass():
    from transformers import AutoModelForCausalLM

    from llm_gym.algorithms.sft import labelled_loss
    from llm_gym.tiny import tiny_model_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("tiny"))
    ids = torch.randint(3, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0  # a right-padded row
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 7:] = ids[0, 7:]  # completions of different starts; row 1 also scores an earlier turn
    labels[1, 3:5], labels[1, 9:] = ids[1, 3:5], ids[1, 9:]
    labels[2, 8:10] = ids[2, 8:10]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    fast = labelled_loss(model, batch)
    fast.backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = completion_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
    full.backward()
    hook.remove()
    # the first scored token is at position 3 (row 1), predicted from position 2: the head sees 12 - 2 positions
    assert seen == [10, 12]
    assert fast.item() == pytest.approx(full.item(), abs=1e-6)
    for g_fast, p in zip(fast_grads, model.parameters()):
        assert torch.allclose(g_fast, p.grad, atol=1e-6)
    assert labelled_loss(model, batch, head_window=False).item() == pytest.approx(full.item(), abs=1e-6)


def test_labelled_loss_runs_the_rows_shared_prefix_once_with_the_same_loss_and_gradients():
    from transformers import AutoModelForCausalLM

    from llm_gym.algorithms.sft_loss import labelled_loss, shared_prefix_length
    from llm_gym.tiny import tiny_model_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("tiny"))
    ids = torch.randint(3, 200, (4, 14))
    ids[:, :6] = ids[0, :6]  # a 6-token prefix common to all rows (a system prompt)
    ids[3, 6] = ids[0, 6]  # row 3 shares one more token: the common prefix stays 6
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # a right-padded row
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 9:] = ids[:, 9:]
    labels[1, 11:] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    assert shared_prefix_length(ids, mask) == 6
    rows = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: rows.append(tuple(args[0].shape)))
    shared = labelled_loss(model, batch)
    shared.backward()
    hook.remove()
    assert rows == [(1, 6), (4, 8)]  # the prefix once (batch 1), then each row's remaining 8 tokens
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = labelled_loss(model, batch, share_prefix=False)
    plain.backward()
    assert shared.item() == pytest.approx(plain.item(), abs=1e-6)
    for g, p in zip(shared_grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_shared_prefix_stops_at_padding_and_at_the_first_differing_token():
    from llm_gym.algorithms.sft_loss import shared_prefix_length

    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 8], [5, 6, 7, 0]])
    assert shared_prefix_length(ids, torch.ones_like(ids)) == 2
    same = torch.tensor([[5, 6, 7], [5, 6, 7]])
    assert shared_prefix_length(same, torch.tensor([[1, 1, 1], [1, 1, 0]])) == 2
    assert shared_prefix_length(torch.tensor([[1, 2], [3, 2]]), torch.ones(2, 2, dtype=torch.long)) == 0
