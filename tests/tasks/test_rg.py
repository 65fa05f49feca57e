"""RG: reasoning-gym datasets behind gym.make: light import, check_env, scores, timeouts, knobs, batched env, CLI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import llm_gym  # noqa: F401  (registers the environments)
from llm_gym.cli import main
from llm_gym.rubric import Rubric
from llm_gym.tasks import rg

needs_rg = pytest.mark.skipif(
    importlib.util.find_spec("reasoning_gym") is None,
    reason="reasoning-gym is not installed: pip install -e '.[reasoning-gym]' (make install installs it)",
)
# A handful of generators of different kinds: arithmetic, text, grids, logic, a sympy scorer, no reference answer.
HANDFUL = ["leg_counting", "basic_arithmetic", "word_sorting", "arc_1d", "knights_knaves", "mini_sudoku",
           "simple_equations", "graph_color"]  # fmt: skip
WRONG = " </think>\n<answer>zzz 12345</answer>"


def test_import_llm_gym_does_not_import_reasoning_gym():
    code = (
        "import sys, gymnasium as gym, llm_gym; "
        "assert 'llm_gym/RG-v0' in llm_gym.list_envs(); "
        "env = gym.make('llm_gym/Zebra-v0'); env.reset(seed=0); env.step('x'); "
        "print('reasoning_gym' in sys.modules, 'sympy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False False"


def test_without_the_package_making_the_env_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import reasoning_gym now fails
    with pytest.raises(ModuleNotFoundError, match=r"llm_gym/RG-v0 needs the reasoning-gym package: pip install "
                       r"'llm-gym\[reasoning-gym\]'"):
        gym.make("llm_gym/RG-v0")


@needs_rg
@pytest.mark.parametrize("name", HANDFUL)
def test_check_env_without_warnings_on_a_handful_of_datasets(name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gym.make("llm_gym/RG-v0", name=name, size=5, pool_size=100, render_mode="ansi")
        env.reset(seed=0)
        env.step("x")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []


@needs_rg
@pytest.mark.parametrize("name", HANDFUL)
def test_the_reference_answer_scores_one_and_a_wrong_one_less(name):
    env = gym.make("llm_gym/RG-v0", name=name, size=4, pool_size=100).unwrapped
    for i, problem in enumerate(env.problems):
        oracle = rg.solve(problem)
        if name == "graph_color":  # its entries have no single reference answer
            assert problem["answer"] is None and oracle is None
        else:
            env.reset(options={"index": i})
            _, reward, _, _, info = env.step(oracle)
            assert (reward, info["rewards"], info["correct"]) == (2.0, {"format": 1.0, "score": 1.0}, True)
        env.reset(options={"index": i})
        _, reward, _, _, info = env.step(WRONG)
        assert info["rewards"]["score"] < 1.0 and not info["correct"] and info["reward_errors"] == {}


@needs_rg
def test_no_answer_tag_scores_zero_and_a_scorer_that_raises_scores_zero():
    env = gym.make("llm_gym/RG-v0", name="prime_factorization", size=2).unwrapped
    env.reset(options={"index": 0})
    _, _, _, _, info = env.step(" </think>\nno tags")
    assert info["rewards"] == {"format": 0.0, "score": 0.0}
    env.reset(options={"index": 0})
    _, _, _, _, info = env.step(" </think>\n<answer>zzz</answer>")  # its scorer calls int("zzz")
    assert info["rewards"] == {"format": 1.0, "score": 0.0} and info["reward_errors"] == {}


@needs_rg
def test_a_hanging_scorer_is_cut_by_the_timeout(monkeypatch):
    assert rg.TASK.rubric.timeout == 5.0  # the project's default limit applies to every reasoning-gym scorer
    env = gym.make("llm_gym/RG-v0", name="leg_counting", size=2,
                   rubric=Rubric(rg.TASK.rubric.funcs, names=rg.TASK.rubric.names, timeout=0.3)).unwrapped  # fmt: skip
    problem = env.problems[0]

    def hang(answer, entry):
        while True:  # a sympy simplification that never returns
            pass

    monkeypatch.setattr(rg._instance(problem["source"], 1), "score_answer", hang)
    env.reset(options={"index": 0})
    start = time.perf_counter()
    _, reward, _, _, info = env.step(rg.solve(problem))
    assert time.perf_counter() - start < 2.0
    assert info["rewards"] == {"format": 1.0, "score": 0.0} and reward == 1.0
    assert info["reward_errors"] == {"score": "timed out after 0.3s"} and env.rubric.failures["score"] == 1


@needs_rg
def test_config_fields_are_knobs():
    env = gym.make("llm_gym/RG-v0", name="leg_counting", min_animals=2, max_animals=2, size=20).unwrapped
    assert env.problems._config == rg.RGConfig(name="leg_counting", params=(("max_animals", 2), ("min_animals", 2)))
    for problem in env.problems:
        assert rg.decode_metadata(problem["metadata"])["num_animals"] == 2
    other = gym.make("llm_gym/RG-v0", name="basic_arithmetic", min_terms=2, max_terms=2, size=3).unwrapped
    assert all(p["source"] == '{"config": {"max_terms": 2, "min_terms": 2}, "name": "basic_arithmetic"}'
               for p in other.problems)  # fmt: skip


@needs_rg
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": "leg_countin"}, ValueError, "reasoning-gym has no dataset 'leg_countin'. Did you mean leg_counting"),
        ({"min_legs": 3}, TypeError, "name='leg_counting' got unknown argument 'min_legs'; its knobs are name, "
         "pool_size and max_animals, max_instances, min_animals, min_instances"),
        ({"seed": 1, "size": 2, "name": "leg_counting", "min_animals": 0}, ValueError,
         "reasoning-gym rejected the config of 'leg_counting'"),
        ({"pool_size": 0}, ValueError, "RGConfig.pool_size=0 must be a positive int"),
        ({"min_animals": {1, 2}}, TypeError, "knob values must be JSON values"),
    ],
)
def test_bad_knobs_name_the_fix(kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
        gym.make("llm_gym/RG-v0", **kwargs)


def test_metadata_round_trip_keeps_tuples_and_non_string_keys():
    metadata = {"grid": ((1, 2), (3, 4)), "colors": {0: "red", 1: "blue"}, "pairs": [(1, "a")], "x": None,
                "tricky": {"__tuple__": [1]}, "nested": {"a": [{"b": (1.5, True)}]}}  # fmt: skip
    text = rg.encode_metadata(metadata)
    assert rg.decode_metadata(text) == metadata and isinstance(rg.decode_metadata(text)["grid"][0], tuple)
    assert rg.encode_metadata(dict(reversed(list(metadata.items())))) == text  # canonical: key order does not matter
    with pytest.raises(TypeError, match="reasoning-gym metadata holds a set"):
        rg.encode_metadata({"s": {1, 2}})


@needs_rg
def test_batched_reasoning_gym_from_task():
    from llm_gym.reasoning_gym import ReasoningGym
    from llm_gym.tiny import build_tokenizer

    tokenizer = build_tokenizer(["legs animals count <answer> </answer> 0123456789"], vocab_size=300)
    env = ReasoningGym.from_task("llm_gym/RG-v0", tokenizer, train_size=6, test_size=4, data_batch_size_per_gpu=3,
                                 name="leg_counting", max_animals=3)  # fmt: skip
    env.reset()
    rows = env.pending_problems()
    completions = [[rg.solve(r), WRONG] for r in rows]
    rewards = env.score(completions)
    assert rewards.tolist() == [[2.0, 1.0]] * 3
    assert env.last_metrics()["accuracy"] == 0.5
    with env.eval_mode():
        env.reset(reset_dataloaders=True)
        test = env.pending_problems()
    assert not {r["question"] for r in test} & {r["question"] for r in rows}


@needs_rg
def test_cli_lists_the_datasets_and_evaluates_the_oracle(capsys):
    assert main(["list", "--rg"]) == 0
    out = capsys.readouterr().out
    assert "leg_counting" in out and "zebra_puzzles" in out and len(out.splitlines()) > 100
    assert main(["eval", "--task", "llm_gym/RG-v0", "--task-kwargs", "name=basic_arithmetic", "max_terms=3",
                 "-n", "4"]) == 0  # fmt: skip
    rows = {line.split("|")[3].strip(): float(line.split("|")[4]) for line in capsys.readouterr().out.splitlines()[2:]}
    expected = {"format": 1.0, "score": 1.0, "total": 2.0, "exact accuracy": 1.0, "pass@1": 1.0, "failed requests": 0.0}
    assert {k: rows[k] for k in expected} == expected


TINY_RUN = """\
sft_steps: 2
sft_examples: 8
sft_batch_size: 4
population: 2
train_size: 8
test_size: 2
prompts_per_step: 2
group_size: 2
max_output_tokens: 8
max_steps: 1
evo_steps: 1
evaluation_interval: 1
"""


@needs_rg
def test_cli_trains_on_a_reasoning_gym_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    argv = ["train", "--config", str(config), "--task", "llm_gym/RG-v0", "--task-kwargs", "name=leg_counting",
            "min_animals=1", "max_animals=2", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Held-out results on 2 llm_gym/RG-v0 problems (greedy):" in out and "elite (GRPO)" in out
