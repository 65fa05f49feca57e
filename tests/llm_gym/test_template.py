"""ConversationTemplate: placeholders, prefill, validation messages, chat-template rendering."""

from __future__ import annotations

import numpy as np
import pytest

from llm_gym.template import ConversationTemplate, TemplateError, format_value

SEED_TEMPLATE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Using {question}, make {answer}. Level {level}."},
    {"role": "assistant", "content": "Let me solve this step by step.\n<think>"},
]


def test_render_fills_every_column_and_keeps_the_prefill_last():
    template = ConversationTemplate(SEED_TEMPLATE)
    messages = template.render({"question": np.array([44, 19, 35]), "answer": 98, "level": "easy", "extra": 1})
    assert messages == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Using [44, 19, 35], make 98. Level easy."},
        {"role": "assistant", "content": "Let me solve this step by step.\n<think>"},
    ]
    assert template.prefill == "Let me solve this step by step.\n<think>"
    assert template.placeholders == {"question", "answer", "level"}


def test_no_prefill_and_literal_braces():
    template = ConversationTemplate([{"role": "user", "content": "Set {{a}} to {question}"}])
    assert template.prefill == ""
    assert template.render({"question": (1, 2)}) == [{"role": "user", "content": "Set {a} to [1, 2]"}]


def test_format_value():
    assert format_value(np.array([1, 2])) == "[1, 2]"
    assert format_value((3, 4)) == "[3, 4]"
    assert format_value(np.int64(7)) == "7"
    assert format_value("x") == "x"


def test_unknown_placeholder_names_it_and_the_columns():
    template = ConversationTemplate(SEED_TEMPLATE)
    with pytest.raises(
        TemplateError,
        match=r"^template placeholder \{level\} is not a column of the problems; available columns: answer, question$",
    ):
        template.render({"question": [1], "answer": 2})


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "a conversation template needs at least one message"),
        ([{"role": "user"}], r"message 0 must be a dict with exactly the keys 'role' and 'content', got \{'role': 'user'\}"),
        ([{"role": "bot", "content": "x"}], "message 0 has role 'bot'; valid roles: system, user, assistant"),
        ([{"role": "user", "content": 3}], "message 0 content must be a string, got int"),
        (
            [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
            "message 0 is an assistant message before the end: only the last message may be an assistant prefill",
        ),
        (
            [{"role": "user", "content": "{0}"}],
            r"placeholder \{0\} is not a column name: use \{column\} with a plain name, and double the braces",
        ),
    ],
)
def test_malformed_templates(messages, message):
    with pytest.raises(TemplateError, match=f"^{message}"):
        ConversationTemplate(messages)


def test_template_round_trips():
    template = ConversationTemplate(SEED_TEMPLATE)
    assert ConversationTemplate(template) == template
    assert template.as_dicts() == SEED_TEMPLATE


def test_render_text_continues_the_prefill(tokenizer):
    template = ConversationTemplate(SEED_TEMPLATE)
    text = template.render_text({"question": [1, 2], "answer": 3, "level": 1}, tokenizer)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nUsing [1, 2], make 3. Level 1.<|im_end|>\n"
        "<|im_start|>assistant\nLet me solve this step by step.\n<think>"
    )


def test_render_text_adds_the_generation_prompt_without_prefill(tokenizer):
    template = ConversationTemplate([{"role": "user", "content": "Double {question}."}])
    assert template.render_text({"question": 4}, tokenizer) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nDouble 4.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_text_keeps_a_prefill_ending_in_whitespace(tokenizer):
    template = ConversationTemplate([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A:\n"}])
    assert template.render_text({}, tokenizer).endswith("<|im_start|>assistant\nA:\n")
