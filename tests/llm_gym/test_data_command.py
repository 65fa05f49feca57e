"""Saved rollouts: the same dataset from every policy, ``data filter``, ``data lengths`` and SFT on them."""

from __future__ import annotations

import pytest

from llm_gym.cli import main
from llm_gym.rollout_dataset import load_rollouts
from tests.endpoint_servers import MODEL, TASK, ScriptedServer, problems, right, wrong


def _rows(out):
    return {line.split("|")[3].strip(): float(line.split("|")[4]) for line in out.splitlines()[2:] if "|" in line}


@pytest.fixture
def oracle_data(tmp_path, capsys):
    """The oracle's rollouts of 4 Subtraction problems, saved."""
    assert main(["eval", "--task", TASK, "-n", "4", "--save-dataset", str(tmp_path / "oracle")]) == 0
    return tmp_path / "oracle", _rows(capsys.readouterr().out)


def test_the_oracle_and_an_endpoint_give_the_same_table_and_dataset(oracle_data, tmp_path, capsys, monkeypatch):
    """An endpoint that answers like the oracle: same rows, same columns, same rewards (one code path)."""
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    folder, oracle_rows = oracle_data
    with ScriptedServer(4, lambda i, attempt: right(problems(4)[i])) as server:
        assert main(["eval", "--task", TASK, "-n", "4", "--base-url", server.base_url, "--model", MODEL,
                     "--out", str(tmp_path / "o"), "--save-dataset", str(tmp_path / "api")]) == 0  # fmt: skip
    api_rows = _rows(capsys.readouterr().out)
    assert api_rows.pop("mean completion tokens") == 7  # the server reports usage; the oracle has no tokens
    assert str(oracle_rows.pop("mean completion tokens")) == "nan"
    assert api_rows == oracle_rows and oracle_rows["exact accuracy"] == 1.0 and oracle_rows["rollouts"] == 4
    oracle, api = load_rollouts(folder), load_rollouts(tmp_path / "api")
    assert oracle.column_names == api.column_names
    assert oracle["prompt"] == api["prompt"] and oracle["completion"] == api["completion"]
    assert oracle["reward"] == api["reward"] == [2.0] * 4


def test_filter_keeps_the_rows_an_expression_selects(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    with ScriptedServer(4, lambda i, a: right(problems(4)[i]) if i % 2 else wrong(problems(4)[i])) as server:
        assert main(["eval", "--task", TASK, "-n", "4", "--base-url", server.base_url, "--model", MODEL,
                     "--out", str(tmp_path / "o"), "--save-dataset", str(tmp_path / "all")]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["data", "filter", str(tmp_path / "all"), "--where", "correct and format == 1",
                 "--out", str(tmp_path / "good")]) == 0  # fmt: skip
    assert "kept 2 of 4 rows (50.0%)" in capsys.readouterr().out
    assert load_rollouts(tmp_path / "good")["problem_index"] == [1, 3]
    assert main(["data", "filter", str(tmp_path / "all"), "--where", "reward < 2 and problem_index != 2",
                 "--out", str(tmp_path / "bad")]) == 0  # fmt: skip
    assert load_rollouts(tmp_path / "bad")["problem_index"] == [0]
    assert main(["data", "filter", str(tmp_path / "all"), "--where", "correct", "--out", str(tmp_path / "good")]) == 2
    assert "exists and is not empty: choose another folder" in capsys.readouterr().err
    assert main(["data", "filter", str(tmp_path / "nope"), "--where", "correct", "--out", str(tmp_path / "x")]) == 2
    assert "is not a saved dataset" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_lengths_count_the_whole_conversation_with_the_chat_template(oracle_data, capsys):
    from transformers import AutoTokenizer

    from llm_gym.tiny import tiny_model_path

    folder, _ = oracle_data
    tokenizer_path = str(tiny_model_path("tiny"))
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    lengths = []
    for row in load_rollouts(folder):  # prompt continued from its prefill, then the answer, then end of turn
        prompt = tok.apply_chat_template(row["prompt"], tokenize=False, continue_final_message=True)
        lengths.append(len(tok(prompt, add_special_tokens=False)["input_ids"])
                       + len(tok(row["completion"][0]["content"], add_special_tokens=False)["input_ids"]) + 1)  # fmt: skip
    longest, shortest = max(lengths), min(lengths)
    assert main(["data", "lengths", str(folder), "--tokenizer", tokenizer_path, "--seq-len", str(longest)]) == 0
    assert f"4 conversations: longest {longest} tokens" in capsys.readouterr().out
    assert main(["data", "lengths", str(folder), "--tokenizer", tokenizer_path, "--seq-len", str(shortest)]) == 0
    fit = sum(n <= shortest for n in lengths)
    assert f"{fit} ({100 * fit / 4:.2f}%) fit within {shortest} tokens" in capsys.readouterr().out


def test_sft_warm_up_trains_on_a_saved_dataset(oracle_data, tmp_path, monkeypatch):
    """``sft_dataset:`` replaces the oracle examples (the train config's hook)."""
    import llm_gym.algorithms.sft as sft
    from llm_gym.algorithms import recipe
    from llm_gym.algorithms.run import warmup

    folder, _ = oracle_data
    seen = []
    real_train = sft.train_sft

    def spy(model, tokenizer, examples, config=None, callback=None):
        seen.extend(examples)
        return real_train(model, tokenizer, examples, config, callback)

    monkeypatch.setattr(sft, "train_sft", spy)
    monkeypatch.setattr(sft, "oracle_examples", lambda *a, **k: pytest.fail("the oracle must not be used"))
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    config = recipe.TrainConfig(task=TASK, task_kwargs={}, sft_steps=2, sft_batch_size=2, sft_dataset=str(folder))
    path, _ = warmup.sft_model(config, tmp_path / "run")
    data = load_rollouts(folder)
    assert [e.completion for e in seen] == [c[0]["content"] for c in data["completion"]]
    assert all(e.prompt.endswith("Let me solve this step by step.\n<think>") for e in seen)
    assert (tmp_path / "run" / "sft_model" / "config.json").is_file()
    with pytest.raises(ValueError, match="sft_dataset='nope' is not a folder"):
        recipe.TrainConfig(sft_dataset="nope")


def test_a_local_model_with_samples_goes_through_the_same_records(oracle_data, tmp_path, capsys):
    from llm_gym.tiny import tiny_model_path

    folder, _ = oracle_data
    argv = ["eval", "--task", TASK, "-n", "4", "-r", "2", "--model", str(tiny_model_path("tiny")),
            "--max-new-tokens", "5", "--save-dataset", str(tmp_path / "local")]  # fmt: skip
    assert main(argv) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["rollouts"] == 8 and rows["failed requests"] == 0 and "pass@2" in rows
    assert 1 <= rows["mean completion tokens"] <= 5  # the model's own tokens (action mask), within the budget
    local = load_rollouts(tmp_path / "local")
    assert local.column_names == load_rollouts(folder).column_names
    assert sorted(zip(local["problem_index"], local["sample"])) == [(i, s) for i in range(4) for s in range(2)]


def test_sft_command_trains_on_a_saved_dataset_and_saves_the_model(oracle_data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    folder, _ = oracle_data
    out = tmp_path / "warm"
    assert main(["sft", "--dataset", str(folder), "--output-dir", str(out), "--steps", "3", "--batch-size", "2"]) == 0
    line = capsys.readouterr().out
    assert "4 examples (100.0% within 512 tokens), 3 steps: loss" in line
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert main(["sft", "--dataset", str(folder), "--output-dir", str(out), "--steps", "3"]) == 2
    assert "exists and is not empty: choose another folder" in capsys.readouterr().err
    assert main(["sft", "--dataset", str(tmp_path / "none"), "--output-dir", str(tmp_path / "w2")]) == 2
    assert "is not a saved dataset" in capsys.readouterr().err and not (tmp_path / "w2").exists()
