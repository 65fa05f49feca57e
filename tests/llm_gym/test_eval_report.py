"""The report's numbers against hand computations; the records' JSON, store and cache round trips."""

from __future__ import annotations

import json
import math

import pytest

from llm_gym.eval_report import pass_at_k, summarize
from llm_gym.request_cache import RequestCache, request_key
from llm_gym.rollout_record import RolloutRecord, failed_record
from llm_gym.rollout_store import RolloutStore, StoreError

PROMPT = [{"role": "user", "content": "q"}]


def _rec(problem, sample, correct, tokens=None, fmt=1.0):
    return RolloutRecord(problem, sample, PROMPT, "a", fmt + float(correct), correct, {"format": fmt,
                         "answer": float(correct)}, tokens, columns={"q": problem})  # fmt: skip


def test_pass_at_k_is_the_unbiased_estimator():
    # n=5 samples, c=2 right, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # = c / n
    assert pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 1, 5) == 1.0
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(2, 1, 3)


def test_summary_of_three_problems_with_four_samples_and_a_failure():
    # problem 0: 4 samples, 1 right; problem 1: 4 samples, 4 right; problem 2: 3 scored (0 right) + 1 failed
    records = [_rec(0, s, s == 0, tokens=10) for s in range(4)] + [_rec(1, s, True, tokens=20) for s in range(4)]
    records += [_rec(2, s, False, fmt=0.0) for s in range(3)] + [failed_record(2, 3, {"q": 2}, PROMPT, "boom")]
    report = summarize(records, samples=4)
    assert (report.problems, report.rollouts, report.failed) == (3, 11, 1)
    assert report.accuracy == pytest.approx(5 / 11)
    # shares 1/4, 1, 0: mean 5/12; SE = std(ddof=1)/sqrt(3)
    shares = [0.25, 1.0, 0.0]
    mean = sum(shares) / 3
    assert report.accuracy_stderr == pytest.approx(math.sqrt(sum((s - mean) ** 2 for s in shares) / 2 / 3))
    # pass@1 = mean of c/n over all 3 problems; pass@4 only over problems with 4 scored samples:
    # problem 0: 1 - C(3,4)/C(4,4) = 1; problem 1: 1
    assert report.pass_at == {1: pytest.approx((0.25 + 1 + 0) / 3), 4: 1.0}
    assert report.rewards == {"format": pytest.approx(8 / 11), "answer": pytest.approx(5 / 11),
                              "total": pytest.approx(13 / 11)}  # fmt: skip
    assert report.mean_completion_tokens == 15.0  # the 8 records that report tokens
    assert [name for name, _ in report.rows()] == ["format", "answer", "total", "exact accuracy",
        "accuracy std error", "pass@1", "pass@4", "mean completion tokens", "rollouts", "failed requests"]  # fmt: skip


def test_store_keeps_the_last_record_per_key_drops_a_cut_line_and_refuses_to_mix_runs(tmp_path):
    run = {"task": "t", "n": 2}
    with RolloutStore(tmp_path / "o", run) as store:
        store.append(failed_record(0, 0, {}, PROMPT, "timeout"))
        store.append(_rec(1, 0, True))
    path = tmp_path / "o" / "rollouts.jsonl"
    path.write_text(path.read_text() + '{"problem": 0, "sam')  # killed mid-line
    with pytest.raises(StoreError, match="pass --resume to continue it, or choose another --out"):
        RolloutStore(tmp_path / "o", run)
    with pytest.raises(StoreError, match="was run with n=2, not 3"):
        RolloutStore(tmp_path / "o", {"task": "t", "n": 3}, resume=True)
    with RolloutStore(tmp_path / "o", run, resume=True) as store:
        assert store.done == {"1:0"}  # the failed one is asked again
        store.append(_rec(0, 0, False))
    again = RolloutStore(tmp_path / "o", run, resume=True)
    assert [(r.key, r.failed) for r in again.records()] == [("0:0", False), ("1:0", False)]
    assert len(path.read_text().splitlines()) == 3 and path.read_text().endswith("\n")
    assert RolloutRecord.from_json(json.loads(path.read_text().splitlines()[1])) == _rec(1, 0, True)


def test_nothing_is_written_before_the_first_record(tmp_path):
    RolloutStore(tmp_path / "o", {"a": 1}).close()
    assert not (tmp_path / "o").exists()


def test_request_cache_keys_on_url_model_messages_sampling_and_sample(tmp_path):
    base = ("http://h/v1", "m", PROMPT, {"temperature": 1.0}, 0)
    keys = {
        request_key(*base),
        request_key("http://other/v1", *base[1:]),
        request_key(base[0], "m2", *base[2:]),
        request_key(base[0], base[1], [{"role": "user", "content": "q2"}], *base[3:]),
        request_key(*base[:3], {"temperature": 0.5}, 0),
        request_key(*base[:4], 1),
    }
    assert len(keys) == 6
    cache = RequestCache(tmp_path / "c")
    key = request_key(*base)
    assert cache.get(key) is None
    cache.put(key, {"text": "hi", "completion_tokens": 2})
    assert RequestCache(tmp_path / "c").get(key) == {"text": "hi", "completion_tokens": 2}
    assert not list((tmp_path / "c").rglob("*.tmp-*"))
