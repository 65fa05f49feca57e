"""Zebra: the solver against brute force, unique and reduced puzzles, rewards by hand, oracle, knobs, speed."""

from __future__ import annotations

import itertools
import time

import datasets
import gymnasium as gym
import numpy as np
import pytest

import llm_gym  # noqa: F401  (registers the environments)
from llm_gym.tasks import zebra
from llm_gym.tasks.countdown import PREFILL
from llm_gym.tasks.zebra import TASK, ZebraConfig, count_solutions, exact_reward, generate, partial_reward
from llm_gym.tasks.zebra import solve as oracle

T = " reasoning </think>\n"
SOLUTION = "House 1: Bob, red, cat\nHouse 2: Alice, blue, dog\nHouse 3: Carol, green, fish"


def holds(clue, where):
    """Whether a clue is true when entity e is in house ``where[e]`` (written from the clue texts, not the solver)."""
    kind, x, y = clue
    if kind == "at":
        return where[x] == y
    if kind == "not_at":
        return where[x] != y
    hx, hy = where[x], where[y]
    return {"same": hx == hy, "not_same": hx != hy, "left_of": hx + 1 == hy, "next_to": abs(hx - hy) == 1,
            "before": hx < hy}[kind]  # fmt: skip


def brute_force(clues, n, m):
    """Every assignment (one permutation per attribute) that satisfies all clues."""
    found = []
    for perms in itertools.product(itertools.permutations(range(n)), repeat=m):
        where = [h for perm in perms for h in perm]  # entity a * n + v -> house
        if all(holds(c, where) for c in clues):
            found.append(where)
    return found


def random_clues(rng, n, m, k):
    """``k`` clues: arbitrary ones (often contradictory) or, half the time, ones true of a random solution."""
    if rng.random() < 0.5:
        house = [[int(h) for h in rng.permutation(n)] for _ in range(m)]
        kinds, cumulative = list(zebra.CLUE_KINDS), [float(i + 1) for i in range(len(zebra.CLUE_KINDS))]
        return [zebra._draw_clue(rng, kinds, cumulative, house) for _ in range(k)]
    clues = []
    for _ in range(k):
        kind = zebra.CLUE_KINDS[int(rng.integers(len(zebra.CLUE_KINDS)))]
        x = int(rng.integers(n * m))
        y = int(rng.integers(n)) if kind in ("at", "not_at") else int(rng.integers(n * m))
        clues.append((kind, x, y))
    return clues


@pytest.mark.parametrize(("n", "m"), [(2, 2), (3, 2), (3, 3), (4, 2)])
def test_solver_counts_like_brute_force_on_random_clue_sets(n, m):
    rng = np.random.default_rng(n * 10 + m)
    seen = set()
    for _ in range(150):
        clues = random_clues(rng, n, m, int(rng.integers(0, 2 * n * m)))
        expected = min(len(brute_force(clues, n, m)), 2)
        assert count_solutions(clues, n, m) == expected, clues
        seen.add(expected)
    assert seen == {0, 1, 2}  # the sample covers contradictions, unique and open puzzles


@pytest.mark.parametrize(("n", "m"), [(3, 3), (4, 3), (4, 2)])
def test_generated_puzzles_have_one_solution_and_no_clue_to_spare(n, m):
    config = ZebraConfig(houses=n, attributes=m)
    for i in range(3):
        problem = generate(np.random.default_rng([7, i]), config)
        values, clues = zebra._parse_puzzle(problem["puzzle"])
        solutions = brute_force(clues, n, m)
        assert len(solutions) == 1
        rows = [[None] * m for _ in range(n)]
        for e, h in enumerate(solutions[0]):
            rows[h][e // n] = values[e // n][e % n]
        assert "\n".join(f"House {h + 1}: {', '.join(r)}" for h, r in enumerate(rows)) == problem["solution"]
        for k in range(len(clues)):  # reduced: without any one clue the puzzle has several solutions
            assert len(brute_force(clues[:k] + clues[k + 1:], n, m)) >= 2


def test_reduce_false_keeps_every_drawn_clue():
    reduced = generate(np.random.default_rng(3), ZebraConfig())
    full = generate(np.random.default_rng(3), ZebraConfig(reduce=False))
    assert full["solution"] == reduced["solution"]
    assert full["puzzle"].count("\n") > reduced["puzzle"].count("\n")


def test_clue_mix_decides_the_clue_kinds():
    only_at = generate(np.random.default_rng(0), ZebraConfig(clue_mix={"at": 1.0}))
    clues = only_at["puzzle"].split("Clues:\n")[1].splitlines()
    assert clues and all(" lives in house " in c for c in clues)
    relational = generate(np.random.default_rng(0), ZebraConfig(clue_mix={"same": 1.0, "left_of": 1.0}))
    _, parsed = zebra._parse_puzzle(relational["puzzle"])
    assert {kind for kind, _, _ in parsed} <= {"same", "left_of"}
    with pytest.raises(RuntimeError, match="no unique Zebra puzzle after 400 clues: widen clue_mix"):
        generate(np.random.default_rng(0), ZebraConfig(houses=2, attributes=2, clue_mix={"not_same": 1.0}))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"houses": 1}, "ZebraConfig.houses=1 must be between 2 and 6"),
        ({"attributes": 7}, "ZebraConfig.attributes=7 must be between 2 and 6"),
        ({"clue_mix": {"sam": 1.0}}, "ZebraConfig.clue_mix has unknown kind 'sam'; kinds: at, not_at, same"),
        ({"clue_mix": {"same": 0.0}}, "weights must be >= 0 with one > 0"),
        ({"clue_mix": {"same": -1.0, "at": 1.0}}, "weights must be >= 0 with one > 0"),
    ],
)
def test_bad_config_names_the_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZebraConfig(**kwargs)


def answer(text):
    return f"{T}<answer>\n{text}\n</answer>"


@pytest.mark.parametrize(
    ("text", "exact", "partial"),
    [
        (SOLUTION, 1.0, 1.0),
        (SOLUTION.lower(), 1.0, 1.0),  # case does not matter
        ("House 1: cat, Bob, red\nHouse 2: dog, blue, Alice\nHouse 3: Carol, fish, green", 1.0, 1.0),  # any order
        ("House 3: Carol, green, fish\nHouse 1: Bob, red, cat\nHouse 2: Alice, blue, dog", 1.0, 1.0),
        ("House 1:Bob,red,cat\n\n  House 2 : Alice , blue , dog\nHouse 3: Carol, green, fish", 1.0, 1.0),
        # one swapped pair of names: 2 of 9 cells wrong
        ("House 1: Alice, red, cat\nHouse 2: Bob, blue, dog\nHouse 3: Carol, green, fish", 0.0, 7 / 9),
        # every pet rotated: 3 of 9 wrong
        ("House 1: Bob, red, dog\nHouse 2: Alice, blue, fish\nHouse 3: Carol, green, cat", 0.0, 6 / 9),
        # malformed: 0 on both
        ("House 1: Bob, red, cat\nHouse 2: Alice, blue, dog", 0.0, 0.0),  # a house missing
        (SOLUTION + "\nHouse 4: Bob, red, cat", 0.0, 0.0),  # an extra line
        ("House 1: Bob, red, cat\nHouse 1: Alice, blue, dog\nHouse 3: Carol, green, fish", 0.0, 0.0),  # house twice
        ("House 0: Bob, red, cat\nHouse 2: Alice, blue, dog\nHouse 3: Carol, green, fish", 0.0, 0.0),
        ("House 1: Bob, red\nHouse 2: Alice, blue, dog\nHouse 3: Carol, green, fish", 0.0, 0.0),  # a value missing
        ("House 1: Bob, red, cat, dog\nHouse 2: Alice, blue, dog\nHouse 3: Carol, green, fish", 0.0, 0.0),
        ("House 1: Bob, red, zebra\nHouse 2: Alice, blue, dog\nHouse 3: Carol, green, fish", 0.0, 0.0),  # unknown
        ("House 1: Bob, red, cat\nHouse 2: Bob, blue, dog\nHouse 3: Carol, green, fish", 0.0, 0.0),  # Bob twice
        ("House 1: Bob red cat\nHouse 2: Alice, blue, dog\nHouse 3: Carol, green, fish", 0.0, 0.0),  # no commas
        ("1: Bob, red, cat\n2: Alice, blue, dog\n3: Carol, green, fish", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_rewards_by_hand(text, exact, partial):
    completion = answer(text)
    assert exact_reward(completion, solution=SOLUTION, prefill=PREFILL) == exact
    assert partial_reward(completion, solution=SOLUTION, prefill=PREFILL) == pytest.approx(partial)


def test_answer_tags_must_be_one():
    twice = answer(SOLUTION) + "<answer>" + SOLUTION + "</answer>"
    for completion in (twice, T + SOLUTION):
        score = TASK.rubric.score(completion, {"puzzle": "", "solution": SOLUTION}, PREFILL)
        assert (score.parts["exact"], score.parts["partial"]) == (0.0, 0.0)


def test_malformed_answers_score_zero_fast():
    lines = "\n".join(f"House {i}: Bob, red, cat" for i in range(1, 200_000))
    for completion in (answer(lines), answer("House 1: " + "Bob, " * 300_000), T + "<answer>" * 200_000,
                       answer("x" * 1_000_000)):  # fmt: skip
        for reward in (exact_reward, partial_reward):  # measured ~25 ms on the 5 MB answer
            start = time.process_time()
            assert reward(completion, solution=SOLUTION, prefill=PREFILL) == 0.0
            assert time.process_time() - start < 0.25


@pytest.mark.parametrize(("n", "m"), [(2, 2), (3, 3), (4, 3), (5, 4), (6, 6)])
def test_oracle_solves_every_generated_puzzle_with_a_trace(n, m):
    config = ZebraConfig(houses=n, attributes=m)
    for i in range(4 if n < 6 else 1):
        problem = generate(np.random.default_rng([1, i]), config)
        completion = oracle(problem)
        score = TASK.rubric.score(completion, problem, PREFILL)
        assert score.parts == {"format": 1.0, "exact": 1.0, "partial": 1.0}
        trace = completion.split("</think>")[0]
        assert trace.count(": house ") == n * m  # one deduction per cell
        assert "(clue " in trace


def test_oracle_declines_puzzles_it_did_not_generate():
    assert oracle({"puzzle": "Who owns the zebra?", "solution": SOLUTION}) is None
    problem = generate(np.random.default_rng(0), ZebraConfig())
    assert oracle({**problem, "puzzle": problem["puzzle"] + "\n99. The moon is made of cheese."}) is None


def test_env_knobs_prompt_and_seeding():
    env = gym.make("llm_gym/Zebra-v0", houses=3, attributes=2, size=10, seed=4)
    problems = list(env.unwrapped.problems)
    assert problems == list(gym.make("llm_gym/Zebra-v0", houses=3, attributes=2, size=10, seed=4).unwrapped.problems)
    for p in problems:
        assert p["solution"].count("\n") == 2 and p["solution"].count(",") == 3
        assert "There are 3 houses in a row" in p["puzzle"]
    obs, _ = env.reset(seed=0)
    user = obs["messages"][1]["content"]
    assert user.endswith(
        "Show your work in <think> </think> tags. Then give the solution in <answer> </answer> tags, one line per "
        "house, written House <number>: <the house's value of each attribute, separated by commas>."
    )
    _, reward, _, _, info = env.step(oracle(problems[env.unwrapped._index]))
    assert reward == 3.0 and info["correct"] is True


def test_env_on_data_in_the_schema():
    row = {"puzzle": "Two houses. Bob is left of Alice.", "solution": "House 1: Bob\nHouse 2: Alice"}
    env = gym.make("llm_gym/Zebra-v0", dataset=datasets.Dataset.from_list([row]))
    env.reset(seed=0)
    _, reward, _, _, info = env.step(T + "<answer>House 1: Alice\nHouse 2: Bob</answer>")
    assert (reward, info["rewards"], info["correct"]) == (1.0, {"format": 1.0, "exact": 0.0, "partial": 0.0}, False)


def test_generation_speed_at_the_default_knobs():
    start = time.process_time()
    for i in range(40):
        generate(np.random.default_rng([2, i]), ZebraConfig())
    seconds = time.process_time() - start
    assert seconds < 4.0, f"{40 / seconds:.0f} puzzles/s"  # measured ~100/s on one shared core
