"""The embedded tiny model and tokenizer: offline build, round-trip through Auto*, caching."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_gym import tiny
from llm_gym.tiny import PRESETS, TinyConfig, build_model, build_tokenizer, tiny_model_path

CORPUS = [
    "<|im_start|>user\nUsing the numbers [3, 5, 7], create an equation that equals 22.<|im_end|>\n"
    "<|im_start|>assistant\n<think>3*5 = 15, 15+7 = 22</think>\n<answer>3*5+7</answer><|im_end|>\n",
    "<|im_start|>user\nWhat is 93 - 48?<|im_end|>\n<|im_start|>assistant\n<answer>45</answer><|im_end|>\n",
] * 20

TEXTS = [
    "Using the numbers [44, 19, 35], create an equation that equals 98.",
    "<|im_start|>user\n1234 - 567 = ?<|im_end|>\n<|im_start|>assistant\n",
    "  héllo\n\n wörld\t(12/4)*3 ",
    "it's 7'll <answer>  </answer>",
]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return tiny_model_path("tiny", cache_dir=tmp_path_factory.mktemp("cache"), corpus=CORPUS)


def test_special_tokens_have_fixed_ids(tiny_tokenizer):
    assert tiny_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tiny_tokenizer.pad_token, tiny_tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert (tiny_tokenizer.eos_token, tiny_tokenizer.eos_token_id) == ("<|im_end|>", 2)
    # special tokens are matched whole, never split into bytes
    assert tiny_tokenizer("<|im_start|>x<|im_end|>").input_ids[0] == 1
    assert tiny_tokenizer("<|im_start|>x<|im_end|>").input_ids[-1] == 2


def test_vocab_size_bounds(tiny_tokenizer):
    assert 259 < len(tiny_tokenizer) <= 300
    with pytest.raises(ValueError, match="at least 259"):
        build_tokenizer(CORPUS, vocab_size=100)


def test_digits_are_single_tokens(tiny_tokenizer):
    ids = tiny_tokenizer("12345", add_special_tokens=False).input_ids
    assert len(ids) == 5
    assert tiny_tokenizer.decode(ids) == "12345"


def test_decode_round_trips_text(tiny_tokenizer):
    for text in TEXTS:
        assert tiny_tokenizer.decode(tiny_tokenizer(text).input_ids) == text


def test_auto_tokenizer_reloads_identically(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + CORPUS[:2]:
        assert loaded(text).input_ids == tiny_tokenizer(text).input_ids, text
    assert loaded.eos_token_id == 2 and loaded.pad_token_id == 0
    assert (loaded.padding_side, loaded.model_max_length) == ("left", 1024)
    assert (tmp_path / "chat_template.jinja").exists()


def test_chat_template_generation_prompt(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_continues_prefill(tiny_tokenizer):
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "Let me think.\n<think> "}]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\nLet me think.\n<think> "
    closed = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert closed.endswith("<think> <|im_end|>\n")


def test_preset_parameter_counts(tiny_tokenizer):
    # tiny, per layer: q 64*64+64, k and v 64*32+32 each, o 64*64, SwiGLU 3*64*256, two norms 2*64
    # = 4160 + 2*2080 + 4096 + 49152 + 128 = 61696; 2 layers + final norm 64 = 123456.
    model = build_model(tiny_tokenizer, "tiny")
    embed = len(tiny_tokenizer) * 64
    assert sum(p.numel() for p in model.parameters()) == 123_456 + embed
    # mini, per layer: q 128*128+128, k and v 128*64+64 each, o 128*128, SwiGLU 3*128*512, norms 256
    # = 16512 + 2*8256 + 16384 + 196608 + 256 = 246272; 4 layers + 128 = 985216.
    mini = build_model(tiny_tokenizer, "mini")
    assert sum(p.numel() for p in mini.parameters()) == 985_216 + len(tiny_tokenizer) * 128
    # small, per layer: q/k/v 512*512+512 each, o 512*512, SwiGLU 3*512*2048, norms 1024
    # = 3*262656 + 262144 + 3145728 + 1024 = 4196864; 8 layers + 512 = 33575424.
    with torch.device("meta"):  # shapes only: random init of 34M parameters takes seconds
        small = build_model(tiny_tokenizer, PRESETS["small"])
    assert sum(p.numel() for p in small.parameters()) == 33_575_424 + len(tiny_tokenizer) * 512


def test_build_model_is_seeded(tiny_tokenizer):
    a, b, c = (build_model(tiny_tokenizer, "tiny", seed=s) for s in (1, 1, 2))
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_config_validation_names_the_rule():
    with pytest.raises(ValueError, match="hidden_size=64 is not divisible by num_heads=5"):
        TinyConfig(num_heads=5)
    with pytest.raises(ValueError, match="num_kv_heads"):
        TinyConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown tiny model preset 'huge'"):
        build_model(None, "huge")


def test_generate_stops_at_eos(saved):
    model = AutoModelForCausalLM.from_pretrained(saved)
    tok = AutoTokenizer.from_pretrained(saved)
    assert model.generation_config.eos_token_id == 2
    assert model.generation_config.pad_token_id == 0
    # Make <|im_end|> the only likely next token: generation must stop right after it.
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every final hidden state is 0, so every logit is 0 ...
    logits_bias = torch.zeros(len(tok))
    logits_bias[2] = 10.0  # ... plus this: <|im_end|> has probability ~0.99
    model.lm_head.register_forward_hook(lambda _m, _i, out: out + logits_bias)
    enc = tok(["hi there", "a longer prompt here"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=8, do_sample=True)
    new = out[:, enc.input_ids.shape[1] :]
    assert new.shape[1] == 1
    assert new[:, 0].tolist() == [2, 2]


def test_cached_path_is_reused(tmp_path, monkeypatch):
    calls = []
    real = tiny.build_model

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny, "build_model", counting)
    first = tiny_model_path("tiny", cache_dir=tmp_path, corpus=CORPUS)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    second = tiny_model_path("tiny", cache_dir=tmp_path, corpus=CORPUS)
    assert first == second and len(calls) == 1
    assert (second / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left behind
    # another seed is another model
    third = tiny_model_path("tiny", cache_dir=tmp_path, corpus=CORPUS, seed=1)
    assert third != first and len(calls) == 2


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path))
    path = tiny_model_path("tiny", corpus=CORPUS)
    assert path.parent == tmp_path and path.name.startswith("tiny-tiny-")


def test_default_corpus_covers_the_default_tasks_only():
    corpus = tiny.default_corpus(problems_per_task=2)
    from llm_gym.registry import get_task, list_task_envs

    generated = [env_id for env_id in list_task_envs() if get_task(env_id).generate is not None]
    # A fixed list, not every registered task: a new task must not change the cached tiny model.
    assert tiny.DEFAULT_CORPUS_TASKS == ("llm_gym/Countdown-v0", "llm_gym/Subtraction-v0")
    assert "llm_gym/Zebra-v0" in generated
    assert len(corpus) == 1 + 2 * len(tiny.DEFAULT_CORPUS_TASKS)  # coverage line + 2 problems of each task
    assert not any("houses in a row" in text for text in corpus)
    zebra = tiny.default_corpus(problems_per_task=2, env_ids=["llm_gym/Zebra-v0"])
    assert len(zebra) == 3 and all("houses in a row" in text for text in zebra[1:])
    countdown = [text for text in corpus if "create an equation that equals" in text]
    assert len(countdown) == 2
    for text in countdown:  # prompt, prefill and oracle completion, closed like a finished turn
        assert "Let me solve this step by step.\n<think> " in text
        assert text.endswith("</answer><|im_end|>\n")
    assert not any("You are playing Tic-Tac-Toe." in text for text in corpus)
    # A custom env (a multi-turn game) asked for by id contributes whole oracle games.
    games = tiny.default_corpus(problems_per_task=2, env_ids=["llm_gym/TicTacToe-v0"])[1:]
    assert len(games) == 2 and all("You are playing Tic-Tac-Toe." in text for text in games)
    for text in games:  # whole oracle games: the rules, moves in the answer format, the final result
        assert text.count("<|im_start|>assistant\n<think>") >= 3 and "</think><move>" in text
        assert text.endswith("<|im_end|>\n") and ("You win!" in text or "draw." in text)
