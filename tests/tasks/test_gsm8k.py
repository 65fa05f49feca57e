"""GSM8K: reference parsing, the numeric verifier by hand, bounded cost, oracle, loading (local and hub path)."""

from __future__ import annotations

import time
from fractions import Fraction

import datasets
import gymnasium as gym
import pytest

import llm_gym  # noqa: F401  (registers the environments)
from llm_gym.tasks.countdown import PREFILL
from llm_gym.tasks.gsm8k import TASK, accuracy_reward, parse_number, reference_number, solve
from tests.task_data import gsm8k_sample

T = " 3*24=72 </think>\n"
ROW = {"question": "How much?", "answer": "A shirt is $<<36*2=72>>72.\n#### 72"}


@pytest.mark.parametrize(
    ("answer", "value"),
    [
        ("x\n#### 72", 72),
        ("x\n#### 1,000", 1000),
        ("x #### 0", 0),
        ("x\n#### -7", -7),
        ("x\n#### 2.5", Fraction(5, 2)),
        ("a #### 3 then\n#### 4", 4),  # the last #### line
    ],
)
def test_reference_number_from_the_hash_line(answer, value):
    assert reference_number(answer) == value


@pytest.mark.parametrize("answer", ["no hash line 72", "x\n#### ", "x\n#### 72 dollars", "x\n#### 70+2"])
def test_reference_number_rejects_malformed_rows(answer):
    with pytest.raises(ValueError, match="####"):
        reference_number(answer)


@pytest.mark.parametrize(
    ("text", "reference", "expected"),
    [
        ("72", "72", 1.0),
        ("72.0", "72", 1.0),
        ("72.00", "72", 1.0),
        ("$72", "72", 1.0),
        ("72 dollars", "72", 1.0),
        ("The answer is 72.", "72", 1.0),
        ("x = 72", "72", 1.0),
        ("**72**", "72", 1.0),
        ("\\boxed{72}", "72", 1.0),
        ("$\\boxed{72}$", "72", 1.0),
        ("\\$72", "72", 1.0),
        ("1,000", "1,000", 1.0),
        ("1000", "1,000", 1.0),
        ("$1,000.00", "1,000", 1.0),
        ("\\boxed{1{,}000}", "1,000", 1.0),
        ("-7", "-7", 1.0),
        ("−7 degrees", "-7", 1.0),
        ("25%", "25", 1.0),
        ("72 or 72", "72", 1.0),  # the same number twice is still one number
        ("73", "72", 0.0),  # a different number
        ("7", "-7", 0.0),  # the sign matters
        ("72.5", "72", 0.0),
        ("72 or 73", "72", 0.0),  # several different numbers
        ("72, 73", "72", 0.0),
        ("", "72", 0.0),  # empty
        ("seventy-two", "72", 0.0),  # no digits
        ("70+2", "72", 0.0),  # arithmetic to evaluate
        ("70 + 2 = 72", "72", 0.0),
        ("36 + 36", "36", 0.0),  # equal numbers joined by an operator are still arithmetic
        ("144/2", "72", 0.0),
        ("6 x 12", "72", 0.0),
        ("8 * 9", "72", 0.0),
        ("75 - 3", "72", 0.0),
        ("\\frac{144}{2}", "72", 0.0),
        ("7.2e1", "72", 0.0),
        ("72k", "72", 0.0),  # a glued suffix changes the value
        ("1,0000", "1,000", 0.0),  # not a thousands grouping
        ("1 000", "1,000", 0.0),
        ("9" * 201, "9" * 201, 0.0),  # longer than 200 characters
    ],
)
def test_accuracy_by_hand(text, reference, expected):
    completion = f"{T}<answer>{text}</answer>"
    assert accuracy_reward(completion, answer=f"...\n#### {reference}", prefill=PREFILL) == expected


@pytest.mark.parametrize(
    ("completion", "fmt", "acc"),
    [
        (T + "<answer>72</answer>", 1.0, 1.0),
        (T + "<answer>72</answer><answer>72</answer>", 1.0, 0.0),  # two answers
        (T + "72", 0.0, 0.0),  # no tags
        (" 3*24=72 </think><answer>72</answer>", 0.0, 1.0),  # newline missing: format only
        (T + "<answer></answer>", 1.0, 0.0),
    ],
)
def test_rubric_parts(completion, fmt, acc):
    score = TASK.rubric.score(completion, TASK.to_problem(ROW), PREFILL)
    assert score.parts == {"format": fmt, "accuracy": acc} and score.errors == {}


def test_verifier_cost_is_bounded_on_adversarial_input():
    problem = TASK.to_problem(ROW)
    for completion in (
        T + "<answer>" + "1," * 500_000 + "</answer>",  # 1 MB inside one answer
        T + "<answer>" * 200_000,  # many openings, no closing tag
        T + "<answer>" + "9" * 150 + " " * 40 + "+" + "</answer>",
        T + "<answer>" + "(" * 190 + "</answer>",
    ):
        start = time.process_time()
        score = TASK.rubric.score(completion, problem, PREFILL)
        assert score.parts["accuracy"] == 0.0 and score.errors == {}
        assert time.process_time() - start < 0.5


def test_a_malformed_reference_is_a_counted_failure_not_a_silent_zero():
    rubric = TASK.rubric.__class__([accuracy_reward], names=["accuracy"])
    score = rubric.score(T + "<answer>72</answer>", {"answer": "no reference line"}, PREFILL)
    assert score.parts == {"accuracy": 0.0} and "ValueError" in score.errors["accuracy"]
    assert rubric.failures["accuracy"] == 1


def test_oracle_is_the_worked_solution_in_the_template():
    assert solve(ROW) == " A shirt is $72. </think>\n<answer>72</answer>"
    two_lines = {"question": "?", "answer": "He sold 48/2 = <<48/2=24>>24.\nSo 48+24 = <<48+24=72>>72 in all.\n#### 72"}
    assert solve(two_lines) == " He sold 48/2 = 24.\nSo 48+24 = 72 in all. </think>\n<answer>72</answer>"
    thousand = {"question": "?", "answer": "25 * 40 = <<25*40=1000>>1000\n#### 1,000"}
    assert solve(thousand).endswith("<answer>1,000</answer>")
    for row in (ROW, two_lines, thousand):
        assert TASK.rubric.score(solve(row), TASK.to_problem(row), PREFILL).parts == {"format": 1.0, "accuracy": 1.0}


def test_prompt_shows_the_question_and_the_answer_format():
    messages = TASK.template.render(TASK.to_problem(ROW))
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == (
        "How much?\nShow your work in <think> </think> tags. And return the final answer, one number, in "
        "<answer> </answer> tags, for example <answer>42</answer>."
    )
    assert messages[2]["content"] == PREFILL


def test_env_reads_the_local_dataset_splits_and_the_oracle_scores_full_marks(tmp_path):
    data = gsm8k_sample()
    data.save_to_disk(str(tmp_path / "gsm8k"))
    for split, rows in (("train", 16), ("test", 8)):
        env = gym.make("llm_gym/GSM8K-v0", dataset=str(tmp_path / "gsm8k"), split=split).unwrapped
        assert len(env.problems) == rows
        assert [p["question"] for p in env.problems] == data[split]["question"]
        for i in range(rows):
            env.reset(options={"index": i})
            _, reward, terminated, truncated, info = env.step(solve(env.problems[i]))
            assert (reward, terminated, truncated, info["correct"]) == (2.0, True, False, True)
    env.reset(options={"index": 0})
    assert env.step(T + "<answer>0</answer>")[4]["correct"] is False


def test_without_a_dataset_the_hub_dataset_is_loaded(monkeypatch):
    """The real loading path: ``datasets.load_dataset("openai/gsm8k", "main")``, here answered locally."""
    calls = []

    def fake_load_dataset(path, name=None, *args, **kwargs):
        calls.append((path, name))
        return gsm8k_sample()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    env = gym.make("llm_gym/GSM8K-v0", split="test").unwrapped
    assert calls == [("openai/gsm8k", "main")] and len(env.problems) == 8
    gym.make("llm_gym/GSM8K-v0", dataset="openai/gsm8k")
    gym.make("llm_gym/GSM8K-v0", dataset="someone/gsm8k-copy")
    assert calls[1:] == [("openai/gsm8k", "main"), ("someone/gsm8k-copy", None)]


def test_a_single_dataset_without_test_split_is_split_by_hash():
    rows = gsm8k_sample()["train"]
    train = list(gym.make("llm_gym/GSM8K-v0", dataset=rows, split="train").unwrapped.problems)
    test = list(gym.make("llm_gym/GSM8K-v0", dataset=rows, split="test").unwrapped.problems)
    assert len(train) + len(test) == 16 and test
    assert not {p["question"] for p in train} & {p["question"] for p in test}


def test_gsm8k_has_no_knobs():
    with pytest.raises(TypeError, match="task GSM8K has no generator knobs; got \\['max_number'\\]"):
        gym.make("llm_gym/GSM8K-v0", dataset=gsm8k_sample(), max_number=3)


def test_parse_number_returns_the_exact_value():
    assert parse_number("$1,000.50") == Fraction(2001, 2)
    assert parse_number("0.1") == Fraction(1, 10)  # exact: no float rounding
    assert parse_number("no number") is None
