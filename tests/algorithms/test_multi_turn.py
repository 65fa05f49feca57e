"""The multi-turn rollout on a toy 2-turn env: token-id trajectories, the loss mask, one advantage per episode."""

from __future__ import annotations

import contextlib

import pytest
import torch
from grpo_tiny import EOS, make_agent, prompt, single_thread

from llm_gym.algorithms.grpo.logps import completion_logps
from llm_gym.algorithms.rollout.completions import mini_batches, pack_completions
from llm_gym.algorithms.rollout.multi_turn import EnvTurn, MultiTurnEnv
from llm_gym.algorithms.rollout.rollout import evaluate, rollout

_one_thread = pytest.fixture(autouse=True)(single_thread)

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
REPLY = [90, 91, 92]  # the env's message between the two model turns: never trained on


class TwoTurnEnv:
    """Toy episodes of two model turns: the model answers, the env replies with REPLY, the model answers again.

    Reward of a trajectory: how many of the model's tokens (both turns) are token 42. The env records
    every turn it receives, so a test can rebuild the trajectory from what was really exchanged.
    """

    max_turns = 2

    def __init__(self, prompts, reply=REPLY, end_after=2):
        self.prompts, self.reply, self.end_after = prompts, list(reply), end_after
        self.received: dict[int, list[list[int]]] = {}
        self.evaluation = False

    def reset(self, reset_dataloaders=False):
        return [prompt(p) for p in self.prompts]

    def start_episodes(self, group_size):
        self.group_size = group_size
        self.received = {r: [] for r in range(len(self.prompts) * group_size)}

    def step_episodes(self, turns):
        replies = {}
        for r, ids in turns.items():
            self.received[r].append(list(ids))
            done = len(self.received[r]) >= self.end_after
            replies[r] = EnvTurn(tokens=() if done else self.reply, done=done)
        return replies

    def finish_episodes(self):
        counts = [sum(t.count(42) for t in self.received[r]) for r in sorted(self.received)]
        self.rewards = torch.tensor(counts, dtype=torch.float32).reshape(len(self.prompts), self.group_size)
        return self.rewards

    def last_metrics(self):
        return {"reward/total": float(self.rewards.mean()), "reward/failures": 0.0}

    @contextlib.contextmanager
    def eval_mode(self):
        self.evaluation = True
        try:
            yield
        finally:
            self.evaluation = False

    def num_problems(self, split=None):
        return len(self.prompts)


def test_toy_env_follows_the_protocol():
    assert isinstance(TwoTurnEnv(PROMPTS), MultiTurnEnv)


def test_trajectories_are_the_exchanged_token_ids_and_the_mask_covers_exactly_the_models_tokens():
    agent = make_agent(group_size=3, max_output_tokens=4)
    env = TwoTurnEnv(PROMPTS)
    batch = rollout(agent, env, env.reset())
    assert batch.turns == 2 and batch.rewards.shape == (3, 3)
    for p, (ids, mask) in enumerate(zip(batch.completion_ids, batch.action_masks, strict=True)):
        assert ids.shape[0] == 3 and mask.shape == (3, ids.shape[1] - 1)
        for g in range(3):
            first, second = env.received[p * 3 + g]
            # Built turn by turn from ids: prompt, the model's first turn, the env's reply, the second turn.
            expected = PROMPTS[p] + first + REPLY + second
            assert ids[g, : len(expected)].tolist() == expected
            assert (ids[g, len(expected) :] == EOS).all()  # right padding
            owner = [False] * len(PROMPTS[p]) + [True] * len(first) + [False] * len(REPLY) + [True] * len(second)
            assert mask[g].tolist() == owner[1:] + [False] * (mask.shape[1] - len(owner) + 1)
            assert first[-1] == EOS or len(first) == 4  # a turn ends at EOS or at the budget


def test_an_episode_that_ends_after_one_turn_gets_no_env_tokens():
    agent = make_agent(group_size=2, max_output_tokens=3)
    env = TwoTurnEnv(PROMPTS[:1], end_after=1)
    batch = rollout(agent, env, env.reset())
    assert batch.turns == 1
    for g in range(2):
        (first,) = env.received[g]
        assert batch.completion_ids[0][g, : 3 + len(first)].tolist() == PROMPTS[0] + first
        assert int(batch.action_masks[0][g].sum()) == len(first)


def test_shared_prompt_log_probs_equal_the_plain_pass_on_masks_with_holes():
    agent = make_agent(group_size=3, max_output_tokens=4)
    env = TwoTurnEnv(PROMPTS)
    batch = rollout(agent, env, env.reset())
    packed = pack_completions(batch.completion_ids, batch.action_masks, 3, EOS)
    assert any(bool((~row[row.nonzero().min() : row.nonzero().max()]).any()) for row in packed.mask)  # holes
    (mb,) = mini_batches(packed, 64)
    with torch.no_grad():
        plain, _ = completion_logps(agent.model, mb, share_prompt=False)
        shared, _ = completion_logps(agent.model, mb, share_prompt=True)
    torch.testing.assert_close(shared[mb.mask], plain[mb.mask], atol=1e-5, rtol=1e-5)


def test_learn_on_episodes_trains_lora_with_one_advantage_per_trajectory():
    agent = make_agent(group_size=4, max_output_tokens=4, beta=0.0)
    env = TwoTurnEnv(PROMPTS)
    before = {n: p.detach().clone() for n, p in agent.model.named_parameters() if p.requires_grad}
    batch = rollout(agent, env, env.reset())
    rewards = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # distinct rewards, no zero advantage
    metrics = agent.learn((batch.completion_ids, batch.action_masks, rewards))
    assert metrics["grpo/trained_fraction"] == 1.0 and metrics["grpo/skipped_updates"] == 0.0
    # completion/length_mean counts the model's tokens only (both turns), never the env's
    model_tokens = sum(len(t) for turns in env.received.values() for t in turns)
    assert metrics["completion/length_mean"] == pytest.approx(model_tokens / 12)
    assert any(not torch.equal(before[n], p) for n, p in agent.model.named_parameters() if p.requires_grad)


def test_evaluate_plays_one_greedy_episode_per_problem():
    agent = make_agent(group_size=4, max_output_tokens=3)
    env = TwoTurnEnv(PROMPTS)
    metrics = evaluate(agent, env)
    assert metrics["problems"] == 3.0 and env.group_size == 1
    assert metrics["reward/total"] == pytest.approx(float(env.rewards.mean()))
    first = {r: list(t) for r, t in env.received.items()}
    evaluate(agent, env)
    assert env.received == first  # greedy: the same episodes again


def test_a_trajectory_that_fills_max_model_len_stops():
    agent = make_agent(group_size=2, max_output_tokens=3, max_model_len=8)
    env = TwoTurnEnv(PROMPTS[2:])  # a 4-token prompt + >= 1 generated + 3 env tokens fill 8: no second turn
    batch = rollout(agent, env, env.reset())
    for g in range(2):
        assert len(env.received[g]) == 1
        assert int(batch.action_masks[0][g].sum()) == len(env.received[g][0])
