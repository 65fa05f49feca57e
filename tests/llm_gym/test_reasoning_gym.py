"""ReasoningGym: batches, epochs, eval_mode, completions as ids or text, and no test-answer leak (#591)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import double_correct, double_format

from llm_gym.reasoning_gym import ReasoningGym
from llm_gym.rubric import Rubric
from llm_gym.template import TemplateError

TEMPLATE = [
    {"role": "system", "content": "Reply with twice the number."},
    {"role": "user", "content": "Double {question}."},
    {"role": "assistant", "content": "<answer>"},
]
TRAIN = [{"question": n, "answer": 2 * n, "n": n, "target": 2 * n} for n in range(10)]
TEST = [{"question": n, "answer": 2 * n, "n": n, "target": 2 * n} for n in range(100, 105)]


def rubric() -> Rubric:
    return Rubric([double_format, double_correct], [0.5, 1.0], names=["format", "correct"], timeout=2.0)


def make_gym(tokenizer, **kwargs) -> ReasoningGym:
    args = {
        "train_dataset": TRAIN, "test_dataset": TEST, "tokenizer": tokenizer, "reward_fn": rubric(),
        "conversation_template": TEMPLATE, "data_batch_size_per_gpu": 4, "correct_part": "correct",
    }
    return ReasoningGym(**{**args, **kwargs})


def numbers(prompts, tokenizer) -> list[int]:
    """The ``n`` shown in each prompt."""
    return [int(re.search(r"Double (\d+)\.", tokenizer.decode(p["input_ids"][0])).group(1)) for p in prompts]


def right(n: int) -> str:
    return f"{2 * n}</answer>"


def test_reset_returns_a_batch_of_tokenized_prompts(tokenizer):
    env = make_gym(tokenizer, return_raw_completions=True)
    prompts = env.reset()
    assert len(prompts) == 4
    for prompt, n in zip(prompts, numbers(prompts, tokenizer), strict=True):
        text = (
            "<|im_start|>system\nReply with twice the number.<|im_end|>\n"
            f"<|im_start|>user\nDouble {n}.<|im_end|>\n<|im_start|>assistant\n<answer>"
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert prompt["input_ids"].tolist() == [ids] and prompt["input_ids"].dtype == torch.long
        assert prompt["attention_mask"].tolist() == [[1] * len(ids)]
        assert prompt["text"] == text
    assert make_gym(tokenizer).reset()[0]["text"] is None


def test_step_scores_text_completions_and_returns_the_next_batch(tokenizer):
    env = make_gym(tokenizer)
    prompts = env.reset()
    ns = numbers(prompts, tokenizer)
    completions = [[right(n), f"{2 * n + 1}</answer>", "nonsense"] for n in ns]
    next_prompts, rewards = env.step(completions)
    assert rewards.shape == (4, 3) and rewards.dtype == torch.float32
    assert rewards.tolist() == [[1.5, 0.5, 0.0]] * 4
    assert not set(numbers(next_prompts, tokenizer)) & set(ns)
    metrics = env.last_metrics()
    assert metrics == pytest.approx({
        "reward/total": 2.0 / 3, "reward/format": 2.0 / 3, "reward/correct": 1.0 / 3,
        "accuracy": 1.0 / 3, "reward/failures": 0.0,
    })


def test_step_scores_token_id_completions(tokenizer):
    env = make_gym(tokenizer, data_batch_size_per_gpu=2)
    prompts = env.reset()
    batch = []
    for prompt, n in zip(prompts, numbers(prompts, tokenizer), strict=True):
        good = tokenizer(right(n), add_special_tokens=False)["input_ids"]
        bad = tokenizer("7</answer>", add_special_tokens=False)["input_ids"]
        width = max(len(good), len(bad)) + 2
        pad = tokenizer.pad_token_id  # right padding, dropped by skip_special_tokens
        rows = [good + [pad] * (width - len(good)), bad + [pad] * (width - len(bad))]
        batch.append(torch.cat([prompt["input_ids"].repeat(2, 1), torch.tensor(rows)], dim=1))  # [2, L + C]
    _, rewards = env.step(batch)
    assert rewards.tolist() == [[1.5, 0.5], [1.5, 0.5]]


def test_batches_cover_the_training_set_then_count_an_epoch(tokenizer):
    env = make_gym(tokenizer)
    assert (len(env), env.num_problems("train"), env.num_problems("test")) == (10, 10, 5)
    assert (env.num_batches("train"), env.num_batches("test"), env.num_batches()) == (3, 2, 3)
    prompts = env.reset()
    seen = []
    sizes = []
    for _ in range(3):
        seen += numbers(prompts, tokenizer)
        sizes.append(len(prompts))
        prompts, _ = env.step([["x"]] * len(prompts))
    assert sizes == [4, 4, 2] and sorted(seen) == list(range(10))
    assert env.num_epochs == 1  # the batch just returned opens epoch 1
    second = []
    for _ in range(3):
        second += numbers(prompts, tokenizer)
        prompts, _ = env.step([["x"]] * len(prompts))
    assert sorted(second) == list(range(10)) and second != seen  # reshuffled each epoch
    assert env.num_epochs == 2


def test_same_seed_same_order(tokenizer):
    def order(seed):
        env = make_gym(tokenizer, seed=seed)
        prompts, out = env.reset(), []
        for _ in range(6):
            out += numbers(prompts, tokenizer)
            prompts, _ = env.step([["x"]] * len(prompts))
        return out

    assert order(3) == order(3) and order(3) != order(4)


def test_eval_mode_covers_the_test_split_once_in_a_fixed_order(tokenizer):
    env = make_gym(tokenizer)
    env.reset()

    def evaluate():
        ns, rewards = [], []
        with env.eval_mode():
            assert env.split == "test"
            prompts = env.reset(reset_dataloaders=True)
            for _ in range(env.num_batches()):
                batch = numbers(prompts, tokenizer)
                ns.append(batch)
                prompts, r = env.step([[right(n)] for n in batch])
                rewards.append(r.tolist())
        assert env.split == "train"
        return ns, rewards

    first = evaluate()
    assert first[0] == [[100, 101, 102, 103], [104]]  # last batch partial
    assert first[1] == [[[1.5]] * 4, [[1.5]]]
    assert evaluate() == first


def test_held_out_splits_come_in_eval_batch_size_batches_and_training_keeps_its_own(tokenizer):
    env = make_gym(tokenizer, eval_batch_size=3)
    assert (env.batch_size_of("train"), env.batch_size_of("test"), env.num_batches("test")) == (4, 3, 2)
    assert len(env.reset()) == 4
    with env.eval_mode():
        prompts = env.reset(reset_dataloaders=True)
        assert numbers(prompts, tokenizer) == [100, 101, 102]
        prompts, _ = env.step([["x"]] * 3)
        assert numbers(prompts, tokenizer) == [103, 104]
    prompts, _ = env.step([["x"]] * 4)
    assert len(prompts) == 4  # training batches keep data_batch_size_per_gpu
    with pytest.raises(ValueError, match="eval_batch_size must be >= 1"):
        make_gym(tokenizer, eval_batch_size=0)


def test_eval_mode_restores_the_mode_after_an_error(tokenizer):
    env = make_gym(tokenizer)
    with pytest.raises(KeyError), env.eval_mode():
        raise KeyError("x")
    assert env.split == "train" and not env.evaluation_mode


def test_no_test_answer_reaches_training_rewards(tokenizer):
    """Regression test for AgileRL #591: after an evaluation, training completions were scored
    against the test batch's answers."""
    env = make_gym(tokenizer)
    train_prompts = env.reset()
    train_ns = numbers(train_prompts, tokenizer)
    with env.eval_mode():
        test_prompts = env.reset(reset_dataloaders=True)
        test_ns = numbers(test_prompts, tokenizer)
        env.step([[right(n)] for n in test_ns])
        env.reset(reset_dataloaders=True)  # a test batch is left pending on purpose
    _, rewards = env.step([[right(n), right(m)] for n, m in zip(train_ns, test_ns, strict=True)])
    # scored against the *training* answers: the train answer is right, the test answer is wrong
    assert rewards.tolist() == [[1.5, 0.5]] * 4
    # completions of the test prompts (as ids) are refused instead of being scored against train answers
    stale = [torch.cat([p["input_ids"], torch.tensor([[5, 6]])], dim=1) for p in test_prompts]
    env.reset(reset_dataloaders=True)
    with pytest.raises(ValueError, match="^completion 0 does not start with prompt 0 of the pending train batch"):
        env.step(stale)
    # and no test problem is ever served for training
    served = set()
    prompts = env.reset(reset_dataloaders=True)
    for _ in range(9):
        served |= set(numbers(prompts, tokenizer))
        prompts, _ = env.step([["x"]] * len(prompts))
    assert served == set(range(10))


def test_state_dict_resumes_the_data_stream(tokenizer):
    env = make_gym(tokenizer)
    prompts = env.reset()
    for _ in range(4):
        prompts, _ = env.step([["x"]] * len(prompts))
    state = env.state_dict()
    expected = numbers(env.step([["x"]] * len(prompts))[0], tokenizer)
    resumed = make_gym(tokenizer)
    resumed.load_state_dict(state)
    assert state == {"num_epochs": 1, "position": {"train": 8, "test": 0}, "seed": 42}  # 4,4,2 | 4,4
    assert numbers(resumed.reset(), tokenizer) == expected


def test_max_context_length_filters_templated_prompts_with_a_warning(tokenizer):
    train = TRAIN[:3] + [{"question": 10**40, "answer": 2 * 10**40, "n": 10**40, "target": 2 * 10**40}]
    lengths = [len(tokenizer(ReasoningGym(train, TEST, tokenizer, rubric(), TEMPLATE).template.render_text(
        row, tokenizer), add_special_tokens=False)["input_ids"]) for row in train]
    limit = max(lengths[:3])
    assert lengths[3] > limit
    with pytest.warns(UserWarning, match=rf"^train: 1 of 4 problems have templated prompts longer than "
                      rf"max_context_length={limit} tokens and were dropped$"):
        env = make_gym(tokenizer, train_dataset=train, test_dataset=TRAIN[:2], max_context_length=limit)
    assert len(env) == 3
    with pytest.raises(ValueError, match=rf"^train: every prompt is longer than max_context_length=3; "
                       rf"the shortest is {min(lengths)} tokens$"), pytest.warns(UserWarning):
        make_gym(tokenizer, train_dataset=train, max_context_length=3)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"data_batch_size_per_gpu": 0}, ValueError, r"^data_batch_size_per_gpu must be >= 1, got 0$"),
        ({"test_dataset": []}, ValueError, r"^test_dataset is empty: give at least one problem$"),
        ({"train_dataset": None}, ValueError, r"^train_dataset is required$"),
        (
            {"conversation_template": [{"role": "user", "content": "{nums}"}]},
            TemplateError,
            r"^train_dataset: template placeholder \{nums\} is not a column of the problems; "
            r"available columns: answer, n, question, target$",
        ),
        (
            {"reward_fn": lambda completion, solution, prompt: 0.0,
             "train_dataset": [{"n": 1, "target": 2}], "conversation_template": [{"role": "user", "content": "{n}"}]},
            ValueError,
            r"^train_dataset needs columns 'question' and 'answer' for a reward_fn\(completion, answer, question\); "
            r"it has \['n', 'target'\]\. Rename columns or pass a Rubric$",
        ),
    ],
)
def test_constructor_errors(tokenizer, kwargs, error, message):
    with pytest.raises(error, match=message):
        make_gym(tokenizer, **kwargs)


def test_step_errors(tokenizer):
    env = make_gym(tokenizer)
    with pytest.raises(RuntimeError, match=r"^no train batch is pending: call reset\(\) before step\(\)$"):
        env.step([["x"]] * 4)
    env.reset()
    with pytest.raises(ValueError, match="^got completions for 3 prompts; the batch has 4$"):
        env.step([["x"]] * 3)
    with pytest.raises(ValueError, match=r"^every prompt needs the same, non-zero number of completions; got \[1, 2\]$"):
        env.step([["x"], ["x", "y"], ["x"], ["x"]])
    with pytest.raises(ValueError, match="^give a list of completion strings per prompt, not one string$"):
        env.step(["x"] * 4)
    with pytest.raises(ValueError, match=r"^a completion tensor must be \[group_size, seq_len\], got \(3,\)$"):
        env.step([torch.zeros(3, dtype=torch.long)] * 4)
    with pytest.raises(ValueError, match=r"^split must be 'train', 'test' or None"):
        env.num_batches("valid")


def test_from_task_uses_the_task_problems_template_and_rubric(tokenizer):
    from llm_gym.registry import get_task

    env = ReasoningGym.from_task("llm_gym/Countdown-v0", tokenizer, train_size=8, test_size=4,
                                 data_batch_size_per_gpu=4, seed=1)
    task = get_task("llm_gym/Countdown-v0")
    assert (len(env), env.num_problems("test"), env.task is task) == (8, 4, True)
    env.reset()
    rows = [env._data["train"]["rows"][i] for i in env._pending["train"]]
    _, rewards = env.step([[task.solve(row), "nope"] for row in rows])
    assert rewards.tolist() == [[2.0, 0.0]] * 4
    assert env.last_metrics()["accuracy"] == 0.5
    train_keys = {repr(r["nums"]) + repr(r["target"]) for r in env._data["train"]["rows"]}
    test_keys = {repr(r["nums"]) + repr(r["target"]) for r in env._data["test"]["rows"]}
    assert not train_keys & test_keys


def test_accelerator_shards_are_equal_and_cover_the_data(tokenizer):
    class FakeAccelerator:  # what ReasoningGym reads from accelerate.Accelerator
        num_processes = 3

        def __init__(self, rank):
            self.process_index = rank

    shards = [make_gym(tokenizer, accelerator=FakeAccelerator(r))._data["train"]["rows"] for r in range(3)]
    # 10 rows padded to 12 by wrapping: ranks get rows [0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]
    assert [[row["n"] for row in shard] for shard in shards] == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]
    test_shards = [make_gym(tokenizer, accelerator=FakeAccelerator(r)).num_problems("test") for r in range(3)]
    assert test_shards == [2, 2, 2]


def test_score_keeps_the_batch_pending_for_every_agent_of_a_population(tokenizer):
    env = make_gym(tokenizer)
    with pytest.raises(RuntimeError, match=r"^no train batch is pending: call reset\(\) first$"):
        env.pending_problems()
    prompts = env.reset()
    ns = numbers(prompts, tokenizer)
    assert [p["n"] for p in env.pending_problems()] == ns
    first = env.score([[right(n)] for n in ns])  # agent 1: all right
    second = env.score([["nonsense"] for _ in ns])  # agent 2, same prompts: all wrong
    assert first.tolist() == [[1.5]] * 4 and second.tolist() == [[0.0]] * 4
    assert [p["n"] for p in env.pending_problems()] == ns  # still the same batch
    next_ns = numbers(env.reset(), tokenizer)  # moves on
    assert not set(next_ns) & set(ns)


def test_from_task_gives_each_env_its_own_rubric_and_failure_counter(tokenizer):
    from llm_gym.registry import get_task

    task = get_task("llm_gym/Countdown-v0")
    a, b = (ReasoningGym.from_task("llm_gym/Countdown-v0", tokenizer, train_size=4, test_size=4) for _ in range(2))
    assert a.rubric is not task.rubric and a.rubric is not b.rubric
    assert a.rubric.names == task.rubric.names and a.rubric.weights == task.rubric.weights
    a.rubric.failures["equation"] += 1
    assert b.rubric.failures == {} and task.rubric.failures == {}


def test_without_a_tokenizer_prompts_are_messages_and_completions_text():
    env = make_gym(None)
    prompts = env.reset()
    assert [set(p) for p in prompts] == [{"messages", "text"}] * 4
    first = prompts[0]["messages"]
    assert first[1] == {"role": "user", "content": f"Double {env.pending_problems()[0]['n']}."}
    rewards = env.score([[right(row["n"])] for row in env.pending_problems()])
    assert rewards.tolist() == [[1.5]] * 4 and env.last_texts == [[right(r["n"])] for r in env.pending_problems()]
    with pytest.raises(ValueError, match="no tokenizer to decode token ids: give completion strings"):
        env.score([torch.zeros(1, 3, dtype=torch.long)] * 4)
    with pytest.raises(ValueError, match="max_context_length counts tokens: give a tokenizer"):
        make_gym(None, max_context_length=8)


def test_side_batch_draws_more_problems_and_keeps_the_pending_batch(tokenizer):
    env = make_gym(tokenizer)
    shared = env.reset(reset_dataloaders=True)
    first = numbers(shared, tokenizer)
    with env.side_batch():
        extra = env.reset()
        assert set(numbers(extra, tokenizer)).isdisjoint(first)  # the next problems of the epoch
        env.score([[right(n)] for n in numbers(extra, tokenizer)])
    # The shared batch is pending again: its completions are scored against its own answers.
    rewards = env.score([[right(n)] for n in first])
    assert rewards.tolist() == [[1.5]] * 4
    assert [p["n"] for p in env.pending_problems()] == first
