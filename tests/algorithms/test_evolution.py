"""Tests for tournament selection, mutations and genes, against a fake agent (no model needed)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from llm_gym.algorithms.evolution.genes import HyperparameterConfig, RLParameter, mutate_value
from llm_gym.algorithms.evolution.lineage import lineage_events
from llm_gym.algorithms.evolution.mutation import Mutations
from llm_gym.algorithms.evolution.protocol import EvolvableAgent
from llm_gym.algorithms.evolution.selection import TournamentSelection, agent_score


class FakeAgent:
    """Follows the agent protocol; records clones and releases in a shared journal."""

    def __init__(self, index: int, fitness: list[float], hps: dict | None = None, journal=None, steps=10):
        self.index = index
        self.fitness = list(fitness)
        self.hps = dict(hps or {"lr": 1e-3, "beta": 0.04, "clip_coef": 0.2, "group_size": 8})
        self.lineage: list[dict] = []
        self.steps = steps
        self.released = False
        self.mut = "None"
        self.journal = journal if journal is not None else []

    def get_hp(self, name):
        return self.hps[name]

    def set_hp(self, name, value):
        self.journal.append(("set_hp", self.index, name, value))
        self.hps[name] = value

    def clone(self, index):
        assert not self.released, "cloned a released agent"
        child = FakeAgent(index, self.fitness, self.hps, self.journal, self.steps)
        child.lineage = copy.deepcopy(self.lineage)
        self.journal.append(("clone", self.index, index))
        return child

    def release(self):
        assert not self.released, "released twice"
        self.released = True
        self.journal.append(("release", self.index))


def make_pop(fitnesses, journal=None):
    journal = [] if journal is None else journal
    return [FakeAgent(i, [f], journal=journal) for i, f in enumerate(fitnesses)]


# ---------------------------------------------------------------- genes


def test_fake_agent_follows_protocol():
    assert isinstance(FakeAgent(0, [1.0]), EvolvableAgent)


@pytest.mark.parametrize(
    ("param", "old", "noise", "expected"),
    [
        (RLParameter(0.05, 0.5), 0.2, 0.5, 0.3),  # 0.2 * 1.5
        (RLParameter(0.05, 0.5), 0.2, -0.25, 0.15),  # 0.2 * 0.75
        (RLParameter(0.05, 0.5), 0.45, 0.5, 0.5),  # 0.675 clipped to max
        (RLParameter(0.05, 0.5), 0.1, -0.9, 0.05),  # 0.01 clipped to min
        (RLParameter(1e-6, 1e-2, log_scale=True), 1e-3, math.log(2.0), 2e-3),  # 1e-3 * e^ln2
        (RLParameter(1e-6, 1e-2, log_scale=True), 1e-3, -math.log(4.0), 2.5e-4),
        (RLParameter(2, 32, dtype=int), 8, 0.1, 9),  # 8.8 rounds to 9
        (RLParameter(2, 32, dtype=int), 8, 0.05, 9),  # 8.4 rounds to 8, forced one step up
        (RLParameter(2, 32, dtype=int), 2, -0.1, 2),  # forced down to 1, clipped back to 2
        (RLParameter(2, 32, dtype=int), 10, -0.25, 8),  # 7.5 rounds half up to 8
        (RLParameter(2, 32, dtype=int), 30, 0.5, 32),  # 45 clipped
    ],
)
def test_mutate_value_hand_derived(param, old, noise, expected):
    new = mutate_value(param, old, noise)
    assert new == pytest.approx(expected, rel=1e-12)
    assert type(new) is param.dtype


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min": 1.0, "max": 1.0}, "must be smaller than max"),
        ({"min": 0.0, "max": 1.0, "log_scale": True}, "needs min > 0"),
        ({"min": 1, "max": 8, "dtype": str}, "dtype"),
        ({"min": 1.5, "max": 8, "dtype": int}, "integer bounds"),
        ({"min": 0.0, "max": math.inf}, "finite"),
    ],
)
def test_rlparameter_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RLParameter(**kwargs)


def test_config_validation_and_default():
    with pytest.raises(ValueError, match="min >= 2"):
        HyperparameterConfig(group_size=RLParameter(1, 8, dtype=int))
    with pytest.raises(ValueError, match="dtype=int"):
        HyperparameterConfig(group_size=RLParameter(2.0, 8.0))
    with pytest.raises(ValueError, match="RLParameter"):
        HyperparameterConfig(lr=(1e-5, 1e-2))
    with pytest.raises(ValueError, match="at least one gene"):
        HyperparameterConfig()
    default = HyperparameterConfig.default()
    assert default.names() == ["lr", "beta", "clip_coef", "temperature", "group_size"]
    assert default["lr"].log_scale and default["group_size"].dtype is int
    assert default["group_size"].min == 2


# ---------------------------------------------------------------- fitness


def test_agent_score_eval_loop_nan_and_missing():
    agent = FakeAgent(3, [0.0, 0.2, 0.4, 0.9])
    assert agent_score(agent) == 0.9
    assert agent_score(agent, eval_loop=3) == pytest.approx((0.2 + 0.4 + 0.9) / 3)
    assert agent_score(FakeAgent(1, [float("nan")])) == -math.inf
    with pytest.raises(ValueError, match="Agent 7 has no fitness yet"):
        agent_score(FakeAgent(7, []))


# ---------------------------------------------------------------- selection


def test_select_elite_ties_to_lowest_index_and_keeps_id():
    pop = make_pop([0.5, 0.9, 0.9, 0.1])
    elite, new = TournamentSelection(2, True, 4, rand_seed=0).select(pop)
    assert elite is new[0]
    assert elite.index == 1
    assert elite.lineage[-1] == {
        "step": 10,
        "event": "elite",
        "agent": 1,
        "parent": 1,
        "fitness": 0.9,
        "generation": 1,
    }
    assert [a.index for a in new[1:]] == [4, 5, 6]  # new ids start above the largest id


def test_select_tournament_winners_hand_derived():
    fit = [0.1, 0.7, 0.3, 0.5, 0.2]
    pop = make_pop(fit)
    ts = TournamentSelection(tournament_size=2, elitism=True, population_size=5, rand_seed=123)
    elite, new = ts.select(pop)
    # Replay the documented draws: one choice(n, size=k, replace=False) per non-elite slot.
    rng = np.random.default_rng(123)
    expected_parents = []
    for _ in range(4):
        pair = [int(i) for i in rng.choice(5, size=2, replace=False)]
        expected_parents.append(max(pair, key=lambda i: (fit[i], -i)))
    assert [a.lineage[-1]["parent"] for a in new] == [1, *expected_parents]
    for child in new[1:]:
        event = child.lineage[-1]
        assert event["event"] == "selected" and event["agent"] == child.index
        assert len(event["contestants"]) == 2
        assert event["parent"] in event["contestants"]
        assert fit[event["parent"]] == max(fit[c] for c in event["contestants"])


def test_select_full_tournament_always_picks_best():
    pop = make_pop([0.3, 0.8, 0.6])
    _, new = TournamentSelection(3, False, 5, rand_seed=1).select(pop)
    assert len(new) == 5
    assert all(a.lineage[-1]["parent"] == 1 for a in new)


def test_select_releases_every_old_agent_after_its_last_clone():
    journal: list = []
    pop = make_pop([0.9, 0.1, 0.2, 0.3], journal)
    _, new = TournamentSelection(4, True, 4, rand_seed=0).select(pop)
    # tournament_size 4 = whole population: every slot is a clone of agent 0.
    assert [a.lineage[-1]["parent"] for a in new] == [0, 0, 0, 0]
    assert all(a.released for a in pop) and not any(a.released for a in new)
    # Unselected agents are released before any cloning; agent 0 right after its last clone.
    assert journal[:3] == [("release", 1), ("release", 2), ("release", 3)]
    assert journal[3:] == [("clone", 0, 0), ("clone", 0, 4), ("clone", 0, 5), ("clone", 0, 6), ("release", 0)]


def test_select_without_elitism_returns_detached_elite():
    pop = make_pop([0.2, 0.6, 0.4])
    elite, new = TournamentSelection(1, False, 3, rand_seed=4).select(pop)
    assert len(new) == 3 and elite not in new
    assert elite.index == 1 and elite.lineage[-1]["event"] == "elite"
    assert [a.index for a in new] == [3, 4, 5]


def test_select_is_reproducible_and_resumable():
    fit = [0.1, 0.4, 0.35, 0.2, 0.3, 0.25]

    def parents(ts, pop):
        return [a.lineage[-1]["parent"] for a in ts.select(pop)[1]]

    a = TournamentSelection(2, True, 6, rand_seed=7)
    b = TournamentSelection(2, True, 6, rand_seed=7)
    assert parents(a, make_pop(fit)) == parents(b, make_pop(fit))
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    first = parents(a, make_pop(fit))
    c = TournamentSelection(2, True, 6, rand_seed=999)
    c.load_state_dict(state)
    pop = make_pop(fit)
    assert parents(c, pop) == first
    assert c.state_dict()["next_id"] == a.state_dict()["next_id"]


def test_select_errors():
    ts = TournamentSelection(2, True, 2)
    with pytest.raises(ValueError, match="empty population"):
        ts.select([])
    with pytest.raises(ValueError, match="no fitness yet"):
        ts.select([FakeAgent(0, [0.1]), FakeAgent(1, [])])
    with pytest.raises(ValueError, match="unique"):
        ts.select([FakeAgent(0, [0.1]), FakeAgent(0, [0.2])])
    with pytest.raises(ValueError, match="tournament_size=0"):
        TournamentSelection(0, True, 2)

    class SharingAgent(FakeAgent):
        def clone(self, index):
            child = super().clone(index)
            child.hps = self.hps
            return child

    with pytest.raises(RuntimeError, match="sharing state"):
        ts.select([SharingAgent(0, [0.1])])


# ---------------------------------------------------------------- mutation


def test_mutation_hand_replayed_with_seeded_rng():
    config = HyperparameterConfig(
        lr=RLParameter(1e-6, 1e-2, log_scale=True),
        clip_coef=RLParameter(0.05, 0.5),
        group_size=RLParameter(2, 32, dtype=int),
    )
    pop = make_pop([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    before = [dict(a.hps) for a in pop]
    muts = Mutations(no_mutation=0.25, rl_hp=0.75, mutation_sd=0.2, rand_seed=11, hp_config=config)
    assert muts.mutation(pop) is pop

    rng = np.random.default_rng(11)
    choices = rng.choice(2, size=6, p=[0.25, 0.75])  # 0 = none, 1 = rl_hp
    mutated = 0
    for agent, choice, hps in zip(pop, choices, before):
        if choice == 0:
            assert agent.hps == hps and agent.mut == "None" and agent.lineage == []
            continue
        mutated += 1
        name = ["lr", "clip_coef", "group_size"][int(rng.integers(3))]
        noise = float(rng.normal(0.0, 0.2))
        expected = mutate_value(config[name], hps[name], noise)
        assert agent.hps[name] == pytest.approx(expected, rel=1e-12)
        assert agent.mut == name
        assert agent.lineage == [
            {
                "step": 10,
                "event": "mutation",
                "agent": agent.index,
                "hp": name,
                "old": hps[name],
                "new": agent.hps[name],
            }
        ]
        assert {k: v for k, v in agent.hps.items() if k != name} == {
            k: v for k, v in hps.items() if k != name
        }
    assert 0 < mutated < 6  # this seed exercises both branches


def test_mutation_logs_each_change(caplog):
    pop = make_pop([0.1, 0.2])
    with caplog.at_level("INFO", logger="llm_gym.algorithms.evolution.mutation"):
        Mutations(0.0, rl_hp=1.0, rand_seed=0).mutation(pop)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mutation: agent")]
    assert len(lines) == 2
    for agent, line in zip(pop, lines):
        event = agent.lineage[-1]
        assert f"agent {agent.index} {event['hp']}" in line


def test_mutation_skips_fresh_elite_unless_asked():
    pop = make_pop([0.9, 0.1, 0.2])
    _, new = TournamentSelection(2, True, 3, rand_seed=0).select(pop)
    Mutations(0.0, rl_hp=1.0, rand_seed=0).mutation(new)
    assert new[0].lineage[-1]["event"] == "elite" and new[0].mut == "None"
    assert all(a.lineage[-1]["event"] == "mutation" for a in new[1:])
    Mutations(0.0, rl_hp=1.0, mutate_elite=True, rand_seed=0).mutation(new)
    assert new[0].lineage[-1]["event"] == "mutation"


def test_pre_training_mutation_mutates_everyone_and_indices_filter():
    pop = make_pop([0.1] * 5)
    Mutations(no_mutation=1.0, rl_hp=1e-9, rand_seed=3).mutation(pop, pre_training_mut=True)
    assert all(a.lineage and a.lineage[-1]["event"] == "mutation" for a in pop)

    pop = make_pop([0.1] * 4)
    Mutations(0.0, rl_hp=1.0, rand_seed=3).mutation(pop, indices=[1, 3])
    assert [len(a.lineage) for a in pop] == [0, 1, 0, 1]


def test_mutation_default_config_uses_genes_the_agent_has():
    agent = FakeAgent(0, [0.1], hps={"temperature": 1.0})
    Mutations(0.0, rl_hp=1.0, mutation_sd=0.1, rand_seed=2).mutation([agent])
    assert agent.lineage[-1]["hp"] == "temperature" and agent.hps["temperature"] != 1.0
    with pytest.raises(ValueError, match="none of the default genes"):
        Mutations(0.0, rl_hp=1.0).mutation([FakeAgent(0, [0.1], hps={"foo": 1.0})])
    config = HyperparameterConfig(learning_rate=RLParameter(1e-5, 1e-2))
    with pytest.raises(ValueError, match=r"\['learning_rate'\] are not hyper-parameters"):
        Mutations(0.0, rl_hp=1.0, hp_config=config).mutation([FakeAgent(0, [0.1])])


def test_mutation_reads_and_writes_dataclass_hps_through_get_hp_and_set_hp():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class HPs:
        lr: float = 1e-3

    class DataclassAgent(FakeAgent):
        """GRPO-style: a frozen config, read and written only through the protocol's two methods."""

        def get_hp(self, name):
            if name not in {f.name for f in dataclasses.fields(self.hps)}:
                raise KeyError(name)
            return getattr(self.hps, name)

        def set_hp(self, name, value):
            self.hps = dataclasses.replace(self.hps, **{name: value})

    agent = DataclassAgent(0, [0.1])
    agent.hps = HPs()
    Mutations(0.0, rl_hp=1.0, mutation_sd=0.1, rand_seed=4).mutation([agent])
    noise = np.random.default_rng(4)
    noise.choice(1, size=1, p=[1.0]), noise.integers(1)
    expected = 1e-3 * math.exp(float(noise.normal(0.0, 0.1)))
    assert agent.hps.lr == pytest.approx(expected, rel=1e-12)
    assert agent.lineage[-1]["hp"] == "lr"


def test_mutation_agent_hp_config_attribute_is_used():
    agent = FakeAgent(0, [0.1])
    agent.hp_config = HyperparameterConfig(beta=RLParameter(1e-4, 0.5, log_scale=True))
    Mutations(0.0, rl_hp=1.0, rand_seed=0).mutation([agent])
    assert agent.lineage[-1]["hp"] == "beta"


def test_mutations_reject_architecture_options():
    with pytest.raises(ValueError, match="only mutate RL hyper-parameters"):
        Mutations(0.4, architecture=0.2, new_layer_prob=0.2, parameters=0.2, activation=0, rl_hp=0.2)
    Mutations(0.4, 0, 0, 0, 0, 0.6, 0.1, rand_seed=1)  # AgileRL positional order, zeros accepted
    with pytest.raises(ValueError, match="mutation_sd=-0.1"):
        Mutations(0.4, rl_hp=0.6, mutation_sd=-0.1)


def test_mutation_rng_state_round_trip():
    a = Mutations(0.2, rl_hp=0.8, rand_seed=5)
    a.mutation(make_pop([0.1] * 3))
    state = json.loads(json.dumps(a.state_dict()))
    pop1 = make_pop([0.1] * 4)
    a.mutation(pop1)
    b = Mutations(0.2, rl_hp=0.8, rand_seed=0)
    b.load_state_dict(state)
    pop2 = make_pop([0.1] * 4)
    b.mutation(pop2)
    assert [x.hps for x in pop1] == [y.hps for y in pop2]


def test_lineage_events_deduplicates_inherited_events():
    pop = make_pop([0.9, 0.1])
    _, new = TournamentSelection(2, True, 3, rand_seed=0).select(pop)
    # tournament of 2 among 2 always picks agent 0: new = [0 (elite), 2, 3]
    assert [(a.index, a.lineage[-1]["parent"]) for a in new] == [(0, 0), (2, 0), (3, 0)]
    Mutations(0.0, rl_hp=1.0, rand_seed=0).mutation(new)  # mutates 2 and 3, not the elite
    for agent, fit in zip(new, [0.1, 0.8, 0.5]):
        agent.fitness.append(fit)
        agent.steps = 20
    ts = TournamentSelection(3, True, 3, rand_seed=0)
    ts.generation = 1
    _, newer = ts.select(new)  # full tournaments: everyone descends from agent 2
    assert [a.index for a in newer] == [2, 4, 5]
    events = lineage_events(newer)
    summary = [(e["event"], e["agent"], e.get("generation")) for e in events]
    # All three survivors inherit agent 2's history (selected, mutation): reported once each.
    # Agent 3's mutation and agent 0's elite event are in no survivor's ancestry.
    assert summary == [
        ("selected", 2, 1),
        ("mutation", 2, None),
        ("elite", 2, 2),
        ("selected", 4, 2),
        ("selected", 5, 2),
    ]


def test_log_scale_gene_at_zero_is_left_off_by_mutation():
    # beta = 0 means "no KL term": the default genes include beta on a log scale, which cannot
    # move from 0; mutation must pick among the other genes instead of failing.
    class Agent:
        def __init__(self):
            self.hps = {"lr": 1e-3, "beta": 0.0}
            self.fitness, self.index, self.lineage, self.steps = [1.0], 0, [], 0

        def get_hp(self, name):
            return self.hps[name]

        def set_hp(self, name, value):
            self.hps[name] = value

    agents = [Agent() for _ in range(20)]
    Mutations(no_mutation=0.0, rl_hp=1.0, mutation_sd=0.1, rand_seed=0).mutation(agents)
    assert all(a.hps["beta"] == 0.0 and a.hps["lr"] != 1e-3 for a in agents)
    only_beta = Mutations(
        no_mutation=0.0, rl_hp=1.0, rand_seed=0, hp_config=HyperparameterConfig(beta=RLParameter(1e-4, 0.5, log_scale=True))
    )
    with pytest.raises(ValueError, match=r"every gene of agent 0 is a log-scale gene at 0 \(\['beta'\]\)"):
        only_beta.mutation([Agent()])


# ---------------------------------------------------------------- fitness that can rank


class _SometimesRight:
    """The oracle's answer on every ``every``-th pending problem; elsewhere a well-formatted wrong one."""

    def __init__(self, env, every: int) -> None:
        self.env, self.every, self.seen = env, every, 0

    def get_action(self, prompts, training=False):
        out = []
        for problem in self.env.pending_problems():
            right = self.seen % self.every == 0 if self.every else False
            self.seen += 1
            out.append([self.env.task.solve(problem) if right else "</think>\n<answer>1 + 1</answer>"])
        return out, None


def test_accuracy_fitness_ranks_where_the_total_reward_does_not():
    from llm_gym.algorithms.evolution.fitness import accuracy_fitness, fitness_of

    saturated = {"accuracy": 0.0, "reward/total": 1.0, "problems": 100}  # format right, never the answer
    better = {"accuracy": 0.2, "reward/total": 0.9, "problems": 100}
    assert fitness_of(saturated, "reward", None) > fitness_of(better, "reward", None)
    assert accuracy_fitness(better, 2.0) > accuracy_fitness(saturated, 2.0)
    # Equal accuracy: the higher total reward wins; but never against one more solved problem.
    assert accuracy_fitness({**better, "reward/total": 1.2}, 2.0) > accuracy_fitness(better, 2.0)
    one_more = {"accuracy": 0.21, "reward/total": 0.0, "problems": 100}
    assert accuracy_fitness(one_more, 2.0) > accuracy_fitness({**better, "reward/total": 2.0}, 2.0)
    assert accuracy_fitness(better, 2.0) == pytest.approx(0.2 + 0.45 / 101)
    assert accuracy_fitness({"reward/total": 0.7}, 2.0) == 0.7  # no accuracy known: the reward
    with pytest.raises(ValueError, match="^unknown fitness 'f1'; valid: \\['reward', 'accuracy'\\]$"):
        fitness_of(better, "f1", 2.0)


def test_selection_on_validation_accuracy_picks_the_better_agent():
    from llm_gym.algorithms.evolution.fitness import fitness_of
    from llm_gym.algorithms.rollout.rollout import evaluate
    from llm_gym.reasoning_gym import ReasoningGym

    knobs = {"min_numbers": 3, "max_numbers": 3, "max_number": 9, "max_target": 30}
    env = ReasoningGym.from_task("llm_gym/Countdown-v0", None, train_size=20, test_size=20, validation_size=40,
                                 seed=0, **knobs)  # fmt: skip
    # Agent 0 always answers in the format but never right; agent 1 solves every 4th problem and
    # answers the rest wrongly in the same format: its total reward is higher only through the answers.
    evals = [evaluate(_SometimesRight(env, every), env, split="validation") for every in (0, 4)]
    assert [e["problems"] for e in evals] == [40.0, 40.0]
    assert evals[0]["accuracy"] == 0.0 and evals[1]["accuracy"] == pytest.approx(0.25)
    pop = [FakeAgent(i, [fitness_of(e, "accuracy", env.rubric.max_total)]) for i, e in enumerate(evals)]
    elite, new_pop = TournamentSelection(2, True, 2, rand_seed=0).select(pop)
    assert elite.index == 1 and new_pop[0].index == 1  # the better agent is the elite, in slot 0
