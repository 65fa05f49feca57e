"""The endpoint evaluation over real HTTP on 127.0.0.1: faults, failures, pass@k, resume after a kill, the cache."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_gym.chat_server import ChatServer, Reply, completion_body, model_responder
from llm_gym.cli import main
from llm_gym.endpoint import EndpointConfig, EndpointFatal, Request, complete_all
from llm_gym.rollout_dataset import load_rollouts
from tests.endpoint_servers import MODEL, TASK, TOKENS, ScriptedServer, right, wrong

ROOT = Path(__file__).resolve().parents[2]


def _rows(out: str) -> dict[str, float]:
    """``reward part -> value`` of the eval table."""
    return {line.split("|")[3].strip(): float(line.split("|")[4]) for line in out.splitlines()[2:] if "|" in line}


def fault_script(i: int, attempt: int) -> Reply | str:
    """Problem 0 right; 1: a 500 first; 2: a 429 first; 3: too slow first; 4: dropped first; 5: always 500;
    6: right on its first request, wrong on its second."""
    from tests.endpoint_servers import problems

    problem = problems(7)[i]
    first = attempt == 1
    if i == 1 and first:
        return Reply(status=500, body={"error": {"message": "boom"}})
    if i == 2 and first:
        return Reply(status=429, body={"error": {"message": "slow down"}}, headers={"Retry-After": "0.1"})
    if i == 3 and first:
        return Reply(delay=3.0, body={})  # past the client's 1 s timeout
    if i == 4 and first:
        return Reply(drop=True)
    if i == 5:
        return Reply(status=503, body={"error": {"message": "overloaded"}})
    if i == 6 and attempt == 2:
        return wrong(problem)
    return right(problem)


def test_faults_are_retried_failures_counted_and_pass_at_k_is_the_hand_computation(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    with ScriptedServer(7, fault_script) as server:
        argv = ["eval", "--task", TASK, "--base-url", server.base_url, "--model", MODEL, "-n", "7", "-r", "2",
                "--timeout", "1", "--max-retries", "2", "--backoff", "0.05", "--concurrency", "4",
                "--out", str(tmp_path / "out"), "--save-dataset", str(tmp_path / "ds")]  # fmt: skip
        assert main(argv) == 0
        asked = dict(server.asked)
    # 14 requests; one retry each for problems 1-4 (one of their two samples hit the fault);
    # problem 5 fails 3 attempts (1 + 2 retries) for each of its 2 samples.
    assert asked == {0: 2, 1: 3, 2: 3, 3: 3, 4: 3, 5: 6, 6: 2}
    rows = _rows(capsys.readouterr().out)
    # Scored: problems 0-4 and 6, two samples each (12); problem 6 has one right of two.
    assert rows["rollouts"] == 12 and rows["failed requests"] == 2
    assert rows["exact accuracy"] == pytest.approx(round(11 / 12, 3))
    # per-problem shares [1, 1, 1, 1, 1, 0.5]: mean 11/12, sample variance 0.208333/5, SE sqrt(0.041667/6) = 1/12
    assert rows["accuracy std error"] == pytest.approx(round(1 / 12, 3))
    assert rows["pass@1"] == pytest.approx(round((5 + 0.5) / 6, 3))  # pass@1 of n=2, c=1 is 1/2
    assert rows["pass@2"] == 1.0
    assert rows["mean completion tokens"] == TOKENS
    assert rows["format"] == 1.0 and rows["total"] == pytest.approx(round(1 + 11 / 12, 3))

    data = load_rollouts(tmp_path / "ds")
    keys = list(zip(data["problem_index"], data["sample"]))
    assert sorted(keys) == [(i, s) for i in (0, 1, 2, 3, 4, 6) for s in (0, 1)]  # each answered once
    assert {"prompt", "completion", "reward", "correct", "format", "answer", "question", "difference"} <= set(
        data.column_names)
    row = data[0]
    assert row["prompt"][-1]["role"] == "assistant" and row["completion"][0]["role"] == "assistant"
    lines = [json.loads(x) for x in (tmp_path / "out" / "rollouts.jsonl").read_text().splitlines()]
    failed = [x for x in lines if x["error"]]
    assert [(x["problem"], x["reward"]) for x in failed] == [(5, None), (5, None)]
    assert "InternalServerError" in failed[0]["error"]


def test_a_429s_retry_after_is_honoured_over_the_backoff():
    def script(i, attempt):
        return Reply(status=429, headers={"Retry-After": "0.2"}, body={}) if attempt == 1 else "ok"

    with ScriptedServer(1, script) as server:
        from tests.endpoint_servers import problems

        messages = [{"role": "user", "content": problems(1)[0]["question"]}]
        config = EndpointConfig(server.base_url, MODEL, backoff=30.0, max_retries=1)
        start = time.perf_counter()
        (answer,) = asyncio.run(complete_all([Request("a", messages)], config))
    assert answer.text == "ok" and answer.attempts == 2
    assert time.perf_counter() - start < 10  # the 30 s backoff would have been used without Retry-After


def test_an_unknown_model_stops_the_run_at_the_first_request():
    with ScriptedServer(2, lambda i, a: "x") as server:
        from tests.endpoint_servers import problems

        requests = [Request(i, [{"role": "user", "content": p["question"]}]) for i, p in enumerate(problems(2))]
        with pytest.raises(EndpointFatal, match="answered 404 for model 'gpt-nope'.*pass the --model name"):
            asyncio.run(complete_all(requests, EndpointConfig(server.base_url, "gpt-nope")))
        assert server.requests == 1  # the second request was never sent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(args, cwd, env_extra=None, **kw):
    env = {**os.environ, "LLM_GYM_CACHE": str(Path(cwd) / ".cache"), "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.Popen([sys.executable, "-m", "llm_gym.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # fmt: skip


def test_resume_after_a_kill_asks_nothing_finished_and_loses_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    log = work / "out" / "rollouts.jsonl"
    with ScriptedServer(6, lambda i, a: "<answer>1</answer>", delay=0.4) as server:
        args = ["eval", "--task", TASK, "--base-url", server.base_url, "--model", MODEL, "-n", "6",
                "--concurrency", "1", "--no-cache", "--out", "out"]  # fmt: skip
        proc = _cli(args, work)
        deadline = time.time() + 120
        while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 2):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        finished = {json.loads(x)["problem"] for x in log.read_text().splitlines() if x.strip()}
        assert 2 <= len(finished) < 6
        before = dict(server.asked)
        resumed = _cli([*args, "--resume", "--save-dataset", "ds"], work)
        out, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err
        after = dict(server.asked)
    asked_on_resume = {i for i in after if after[i] > before.get(i, 0)}
    assert asked_on_resume == set(range(6)) - finished  # nothing finished was asked again
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert sorted(r["problem"] for r in records) == list(range(6))  # no duplicate, none lost
    assert sorted(load_rollouts(work / "ds")["problem_index"]) == list(range(6))
    assert _rows(out)["rollouts"] == 6 and _rows(out)["failed requests"] == 0


@pytest.fixture(scope="module")
def tiny_server():
    from llm_gym.tiny import tiny_model_path

    with ChatServer(model_responder(str(tiny_model_path("tiny")), "tiny"), "tiny") as server:
        yield server


def test_the_tiny_model_endpoint_scores_like_any_policy_and_the_cache_makes_a_rerun_free(
    tiny_server, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    argv = ["eval", "--task", TASK, "--base-url", tiny_server.base_url, "--model", "tiny", "-n", "3", "-r", "2",
            "--max-tokens", "6", "--temperature", "1.0"]  # fmt: skip
    start = tiny_server.requests
    assert main([*argv, "--out", str(tmp_path / "a"), "--save-dataset", str(tmp_path / "ds")]) == 0
    first = _rows(capsys.readouterr().out)
    assert tiny_server.requests - start == 6 and first["rollouts"] == 6 and first["failed requests"] == 0
    assert 1 <= first["mean completion tokens"] <= 6  # the server's usage, within --max-tokens
    middle = tiny_server.requests
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert tiny_server.requests == middle  # every answer came from the cache
    assert _rows(capsys.readouterr().out) == first
    a = [json.loads(x)["completion"] for x in (tmp_path / "a" / "rollouts.jsonl").read_text().splitlines()]
    b = [json.loads(x)["completion"] for x in (tmp_path / "b" / "rollouts.jsonl").read_text().splitlines()]
    assert sorted(a) == sorted(b) and len(set(a)) > 1  # the two samples of a problem are separate draws
    data = load_rollouts(tmp_path / "ds")
    assert len(data) == 6 and set(data.column_names) >= {"prompt", "completion", "reward", "correct", "format"}


def _bad(args, cwd, env_extra=None):
    proc = _cli(args, cwd, env_extra)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err.strip(), out


def test_bad_input_is_one_line_naming_the_fix_status_2_and_writes_nothing(tmp_path, tiny_server):
    from datasets import Dataset

    data = tmp_path / "ds"
    Dataset.from_list([{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant",
                       "content": "a"}], "reward": 1.0, "correct": True, "format": 1.0}]).save_to_disk(str(data))  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    url = tiny_server.base_url
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    common = ["--task", TASK, "-n", "2", "--out", "out", "--save-dataset", "saved"]
    cases = [
        (["eval", *common, "--base-url", dead, "--model", "tiny", "--max-retries", "1", "--backoff", "0.05"], {},
         f"cannot reach {dead}"),
        (["eval", *common, "--base-url", url, "--model", "gpt-5-mini"], {}, "answered 404 for model 'gpt-5-mini'"),
        (["eval", *common, "--base-url", url, "--model", "tiny", "--api-key-env", "MY_KEY"], {},
         "--api-key-env MY_KEY: that environment variable is not set; export MY_KEY="),
        (["eval", *common, "--base-url", url, "--model", "tiny", "-r", "0"], {}, "-r 0: ask at least one sample"),
        (["eval", *common, "--base-url", url, "--model", "tiny", "--timeout", "0"], {},
         "--timeout 0.0 must be positive seconds"),
        (["eval", *common, "--base-url", url], {}, "--base-url needs --model NAME"),
        (["data", "filter", str(data), "--where", "correct and formt == 1", "--out", "kept"], {},
         "unknown column 'formt'; did you mean 'format'?"),
        (["data", "filter", str(data), "--where", "__import__('os').system('true')", "--out", "kept"], {},
         "function calls are not allowed"),
    ]
    for args, env, expected in cases:
        code, err, out = _bad(args, work, env)
        assert code == 2, (args, err)
        assert len(err.splitlines()) == 1 and expected in err, (args, err)
        assert list(work.iterdir()) == [], (args, list(work.iterdir()))  # nothing written, cache included


def test_a_prefill_is_continued_by_default_or_dropped_for_apis_that_cannot_continue(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    from tests.endpoint_servers import problems

    rows = problems(2)
    answers = {
        "continue": lambda i, attempt: right(rows[i]),  # continues "...step by step.\n<think>"
        "drop": lambda i, attempt: "<think>" + right(rows[i]),  # a whole turn must open with <think> itself
    }
    for mode in ("continue", "drop"):
        with ScriptedServer(2, answers[mode]) as server:
            assert main(["eval", "--task", TASK, "--base-url", server.base_url, "--model", MODEL, "-n", "2",
                         "--prefill", mode, "--out", str(tmp_path / mode)]) == 0  # fmt: skip
            bodies = server.bodies
        table = _rows(capsys.readouterr().out)
        assert table["format"] == 1.0 and table["exact accuracy"] == 1.0
        last = {b["messages"][-1]["role"] for b in bodies}
        if mode == "continue":
            assert last == {"assistant"} and all(b.get("continue_final_message") is True for b in bodies)
            assert all(b.get("add_generation_prompt") is False for b in bodies)
        else:
            assert last == {"user"} and not any("continue_final_message" in b for b in bodies)
    record = json.loads((tmp_path / "drop" / "rollouts.jsonl").read_text().splitlines()[0])
    assert record["prompt"][-1]["role"] == "user" and record["completion"].startswith("<think>")


def test_when_every_request_fails_the_failures_are_shown_and_resume_asks_them_again(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    from tests.endpoint_servers import problems

    rows = problems(2)
    healthy = [False]

    def script(i, attempt):
        return right(rows[i]) if healthy[0] else Reply(status=502, body={"error": {"message": "bad gateway"}})

    with ScriptedServer(2, script) as server:
        argv = ["eval", "--task", TASK, "--base-url", server.base_url, "--model", MODEL, "-n", "2",
                "--max-retries", "1", "--backoff", "0.01", "--out", str(tmp_path / "o"),
                "--save-dataset", str(tmp_path / "ds")]  # fmt: skip
        assert main(argv) == 1
        captured = capsys.readouterr()
        table = _rows(captured.out)
        assert table["rollouts"] == 0 and table["failed requests"] == 2
        assert "every request failed, so there is no dataset to save" in captured.err
        assert not (tmp_path / "ds").exists()
        assert dict(server.asked) == {0: 2, 1: 2}  # one retry each, then recorded as failed
        healthy[0] = True
        assert main([*argv, "--resume"]) == 0  # the failed ones are asked again, and now answered
        assert _rows(capsys.readouterr().out)["rollouts"] == 2 and dict(server.asked) == {0: 3, 1: 3}
    assert len(load_rollouts(tmp_path / "ds")) == 2


def test_streamed_answers_are_joined_counted_and_a_stream_cut_short_is_retried(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    from tests.endpoint_servers import problems

    rows = problems(3)

    def script(i, attempt):
        if i == 1 and attempt == 1:  # two words of the answer, then the connection drops
            return Reply(body=completion_body(MODEL, right(rows[i]), 10, TOKENS), drop_after=2)
        return right(rows[i])

    with ScriptedServer(3, script) as server:
        assert main(["eval", "--task", TASK, "--base-url", server.base_url, "--model", MODEL, "-n", "3", "--stream",
                     "--backoff", "0.01", "--out", str(tmp_path / "o")]) == 0  # fmt: skip
        assert all(b.get("stream") is True for b in server.bodies) and dict(server.asked) == {0: 1, 1: 2, 2: 1}
    table = _rows(capsys.readouterr().out)
    assert table["exact accuracy"] == 1.0 and table["format"] == 1.0 and table["failed requests"] == 0
    assert table["mean completion tokens"] == TOKENS  # the usage chunk, not the word count
    records = [json.loads(x) for x in (tmp_path / "o" / "rollouts.jsonl").read_text().splitlines()]
    assert sorted(r["completion"] for r in records) == sorted(right(r) for r in rows)  # words joined back exactly


def test_a_stream_reports_its_tokens_as_they_arrive():
    from llm_gym.endpoint import EndpointClient

    seen = []
    with ScriptedServer(1, lambda i, a: "one two three four") as server:
        from tests.endpoint_servers import problems

        async def ask():
            client = EndpointClient(EndpointConfig(server.base_url, MODEL, stream=True))
            client.on_tokens = lambda key, n: seen.append((key, n))
            try:
                return await client.ask(Request("k", [{"role": "user", "content": problems(1)[0]["question"]}]))
            finally:
                await client.close()

        answer = asyncio.run(ask())
    assert answer.text == "one two three four" and answer.completion_tokens == TOKENS
    assert seen == [("k", 1)] * 4  # one call per streamed word, before the answer was complete
