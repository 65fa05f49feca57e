"""Dynamic sampling (llm_gym.algorithms.grpo.dynamic) on hand-built groups: zero-variance groups
dropped, refills drawn until the batch is full, and bounded."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from llm_gym.algorithms.grpo.config import GRPOConfig
from llm_gym.algorithms.grpo.dynamic import drop_zero_std, informative_groups, sample

G = 4
MIXED, ZERO, ONES = [0.0, 1.0, 0.0, 2.0], [0.0] * G, [2.0] * G


class ScriptedEnv:
    """Batches of problem ids; each id's ``G`` rewards are fixed in ``table``."""

    def __init__(self, batches: list[list[int]], table: dict[int, list[float]]) -> None:
        self.batches, self.table, self.next, self.pending, self.resets = batches, table, 0, None, 0

    def reset(self, reset_dataloaders: bool = False) -> list[dict]:
        self.pending = self.batches[self.next]
        self.next += 1
        self.resets += 1
        return [{"id": i} for i in self.pending]

    def score(self, completions: list[list[str]]) -> torch.Tensor:
        assert [int(c[0]) for c in completions] == self.pending  # scored against its own batch
        return torch.tensor([self.table[i] for i in self.pending])

    def last_metrics(self) -> dict[str, float]:
        return {"reward/total": 0.5}

    @contextmanager
    def side_batch(self):
        saved = self.pending
        yield
        self.pending = saved


class TextPolicy:
    """``G`` copies of the problem id as text; carries the agent's config."""

    def __init__(self, **settings) -> None:
        self.hps = GRPOConfig(group_size=G, **settings)

    def get_action(self, prompts, training=True):
        return [[str(p["id"])] * G for p in prompts], None


def _ids(batch) -> list[int]:
    return [int(c[0]) for c in batch.completion_ids]


def test_informative_groups_by_hand():
    rewards = torch.tensor([MIXED, ZERO, ONES, [1.0, 1.0, 1.0, 1.5]])
    assert informative_groups(rewards).tolist() == [True, False, False, True]


def test_off_is_a_plain_rollout():
    env = ScriptedEnv([[1, 2]], {1: MIXED, 2: ZERO})
    out = sample(TextPolicy(), env, env.reset())
    assert out.batch is out.first and out.metrics == {"completion/generated_tokens": 0.0}  # text: no tokens
    assert _ids(out.batch) == [1, 2]
    assert env.resets == 1


def test_zero_variance_groups_are_dropped_and_refilled_until_the_batch_is_full():
    # Draw 1: 1, 2 informative, 3, 4 not. Refill 1: only 6 informative. Refill 2: 9, 10 informative,
    # but one more group fills the batch of 4: 10 is cut off. Zero-variance: 2 + 3 + 2 of 12 groups.
    table = {1: MIXED, 2: MIXED, 3: ZERO, 4: ONES, 5: ZERO, 6: MIXED, 7: ONES, 8: ZERO,
             9: MIXED, 10: MIXED, 11: ZERO, 12: ZERO}  # fmt: skip
    env = ScriptedEnv([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]], table)
    prompts = env.reset()
    out = sample(TextPolicy(dynamic_sampling=True, max_refills=5), env, prompts)
    assert _ids(out.batch) == [1, 2, 6, 9]
    assert out.batch.rewards.tolist() == [MIXED] * 4
    assert out.metrics == {"grpo/frac_reward_zero_std": pytest.approx(7 / 12), "grpo/refills": 2.0,
                           "grpo/groups": 4.0, "completion/generated_tokens": 0.0}  # fmt: skip
    assert _ids(out.first) == [1, 2, 3, 4]  # the shared batch, unfiltered, for the logs
    assert env.pending == [1, 2, 3, 4]  # still pending for the next agent of the population
    assert env.resets == 3


def test_refills_are_bounded_then_it_trains_on_what_there_is():
    table = {i: ZERO for i in range(1, 13)} | {7: MIXED}
    env = ScriptedEnv([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]], table)
    out = sample(TextPolicy(dynamic_sampling=True, max_refills=2), env, env.reset())
    assert env.resets == 3  # the step's batch + 2 refills, not the 4th batch
    assert _ids(out.batch) == [7] and out.metrics["grpo/refills"] == 2.0 and out.metrics["grpo/groups"] == 1.0
    assert out.metrics["grpo/frac_reward_zero_std"] == pytest.approx(11 / 12)


def test_no_informative_group_at_all_trains_on_the_first_draw():
    env = ScriptedEnv([[1, 2], [3, 4]], {1: ZERO, 2: ONES, 3: ONES, 4: ZERO})
    out = sample(TextPolicy(dynamic_sampling=True, max_refills=1), env, env.reset())
    assert out.batch is out.first and out.metrics["grpo/frac_reward_zero_std"] == 1.0
    assert out.metrics["grpo/groups"] == 0.0


def test_an_env_without_side_batch_is_only_filtered():
    env = ScriptedEnv([[1, 2, 3]], {1: ZERO, 2: MIXED, 3: ZERO})
    env.side_batch = None  # e.g. a multi-turn env
    out = sample(TextPolicy(dynamic_sampling=True), env, env.reset())
    assert _ids(out.batch) == [2] and out.metrics["grpo/refills"] == 0.0


def test_drop_zero_std_by_hand():
    ids = [torch.full((G, 3), k) for k in range(3)]
    masks = [torch.ones(G, 2, dtype=torch.bool) * k for k in range(3)]
    (kept_ids, kept_masks, rewards), share = drop_zero_std((ids, masks, torch.tensor([ZERO, MIXED, ONES])))
    assert [int(t[0, 0]) for t in kept_ids] == [1] and rewards.tolist() == [MIXED] and len(kept_masks) == 1
    assert share == pytest.approx(2 / 3)
    (all_ids, _, all_rewards), share = drop_zero_std((ids, masks, torch.tensor([ZERO, ZERO, ONES])))
    assert len(all_ids) == 3 and all_rewards.shape == (3, G) and share == 1.0  # nothing varies: unchanged


def test_config_rejects_negative_refills():
    with pytest.raises(ValueError, match="max_refills=-1 is invalid: it must be >= 0"):
        GRPOConfig(max_refills=-1)


def test_learn_drops_zero_variance_groups_with_dynamic_sampling():
    from grpo_tiny import make_agent, prompt

    agent = make_agent(dynamic_sampling=True, beta=0.04)
    ids, masks = agent.get_action([prompt([5, 6]), prompt([7, 8])])
    metrics = agent.learn((ids, masks, torch.tensor([ZERO, MIXED])))
    assert metrics["grpo/frac_reward_zero_std"] == 0.5  # of the batch given
    assert metrics["reward/mean"] == pytest.approx(0.75)  # mean of MIXED alone (0.375 with the ZERO group)
