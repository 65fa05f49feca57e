"""Multi-turn GRPO on TicTacToe: token-id trajectories under a template that rewrites earlier turns,
the loss mask, one advantage per trajectory, SFT examples in the rollout's layout, a learning test."""

from __future__ import annotations

import re

import pytest
import torch
from grpo_tiny import EOS, make_agent, make_tokenizer

from llm_gym.algorithms.rollout.multi_turn import play_held_out, run_episodes
from llm_gym.algorithms.rollout.rollout import rollout
from llm_gym.algorithms.sft import IGNORE_INDEX, example_row
from llm_gym.multi_turn import ConversationExample, conversation_ids, env_turn_ids, prompt_ids
from llm_gym.tasks.tictactoe import Player, teacher_conversations
from llm_gym.tasks.tictactoe.training import make_training_env, stats_from_records

# Qwen3-style: earlier assistant turns lose their <think> block; only the last one keeps it.
DROP_THINK = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last and '</think>' in m['content'] %}"
    "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def tokenizer():
    tok = make_tokenizer()
    tok.chat_template = DROP_THINK
    return tok


class ScriptedIds:
    """A policy in the rollout's id format that writes ``<think>t</think><move>c</move>`` + EOS, c = 1, 2, ..."""

    def __init__(self, tokenizer):
        self.tokenizer, self.pad_token_id, self.calls = tokenizer, EOS, 0
        self.sent: list[list[int]] = []

    def get_action(self, prompts, training=True, group_size=None):
        group = group_size or 2
        ids, masks = [], []
        for p in prompts:
            prompt = p["input_ids"][0].tolist()
            rows = []
            for _ in range(group):
                self.calls += 1
                turn = self.tokenizer(f"<think>t{self.calls}</think><move>{self.calls % 9 + 1}</move>",
                                      add_special_tokens=False)["input_ids"] + [EOS]  # fmt: skip
                self.sent.append(turn)
                rows.append(prompt + turn)
            ids.append(torch.tensor(rows))
            masks.append(torch.tensor([[False] * (len(prompt) - 1) + [True] * len(rows[0][len(prompt):])] * group))
        return ids, masks


def test_trajectory_is_built_from_ids_and_the_mask_covers_exactly_the_models_tokens(tokenizer):
    env = make_training_env(tokenizer, data_batch_size_per_gpu=2, test_games=2)
    policy = ScriptedIds(tokenizer)
    episodes = run_episodes(policy, env, env.reset())
    records = env.last_records
    assert episodes.rewards.shape == (2, 2)
    sent = iter(policy.sent)
    turns_of = {r: [] for r in range(4)}
    # Turn order of the calls: first turn all 4 trajectories, then the running ones, in order.
    running = list(range(4))
    while running:
        for r in running:
            turns_of[r].append(next(sent))
        running = [r for r in running if len(turns_of[r]) < records[r].turns]
    for r, record in enumerate(records):
        messages = record.observation["messages"]
        expected, owner = prompt_ids(messages[:2], tokenizer), []
        owner = [False] * len(expected)
        for k, turn in enumerate(turns_of[r]):
            expected += turn
            owner += [True] * len(turn)
            if k + 1 < len(turns_of[r]):  # the env's reply between two model turns
                reply = env_turn_ids(messages[2 + 2 * k + 1], tokenizer, after=turn)
                expected += reply
                owner += [False] * len(reply)
        ids, mask = episodes.completion_ids[r // 2][r % 2], episodes.action_masks[r // 2][r % 2]
        assert ids[: len(expected)].tolist() == expected
        assert mask[: len(expected) - 1].tolist() == owner[1:]
        assert not mask[len(expected) - 1 :].any()
        assert int(mask.sum()) == sum(map(len, turns_of[r]))
        # Re-tokenising the rendered conversation would not give these ids: the template dropped
        # the earlier <think> blocks, which the trajectory (and the model's context) keeps.
        rendered = tokenizer(tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False),
                             add_special_tokens=False)["input_ids"]  # fmt: skip
        assert len(turns_of[r]) > 1 and rendered[: len(expected)] != expected[: len(rendered)]
        assert tokenizer.decode(expected).count("<think>t") == len(turns_of[r])  # the system prompt has <think>T


def test_env_turn_ids_close_a_cut_turn_and_skip_the_eos_the_model_wrote(tokenizer):
    message = {"role": "user", "content": "ok"}
    cut = env_turn_ids(message, tokenizer, after=tokenizer("<move>1", add_special_tokens=False)["input_ids"])
    assert tokenizer.decode(cut) == "<|im_end|>\n<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    closed = env_turn_ids(message, tokenizer, after=[5, im_end])
    assert closed == cut[1:]


def test_conversation_ids_match_the_rollout_layout_and_label_only_assistant_turns(tokenizer):
    conversation = teacher_conversations(6, seed=0)[0]
    ids, labels = conversation_ids(conversation, tokenizer)
    assert len(ids) == len(labels)
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    turns = [m["content"] for m in conversation if m["role"] == "assistant"]
    expected = [t for turn in turns for t in tokenizer(turn, add_special_tokens=False)["input_ids"] + [EOS]]
    assert trained == expected
    assert example_row(ConversationExample(tuple(conversation)), tokenizer) == (ids, labels)
    assert ids[: len(prompt_ids(conversation[:2], tokenizer))] == prompt_ids(conversation[:2], tokenizer)


def test_learn_on_game_episodes_trains_the_lora_adapter(tokenizer):
    agent = make_agent(group_size=4, max_output_tokens=8, beta=0.0, max_model_len=2048)
    env = make_training_env(tokenizer, data_batch_size_per_gpu=2, test_games=2, max_turns=2)
    before = {n: p.detach().clone() for n, p in agent.model.named_parameters() if p.requires_grad}
    batch = rollout(agent, env, env.reset())
    assert batch.turns == 2 and batch.metrics["reward/invalid_move"] == 1.0  # random chars: invalid moves
    rewards = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    metrics = agent.learn((batch.completion_ids, batch.action_masks, rewards))
    assert metrics["grpo/trained_fraction"] == 1.0
    assert any(not torch.equal(before[n], p) for n, p in agent.model.named_parameters() if p.requires_grad)


def test_an_episode_stopped_at_the_context_length_is_forfeited_as_a_loss(tokenizer):
    env = make_training_env(tokenizer, data_batch_size_per_gpu=1, test_games=1)
    policy = ScriptedIds(tokenizer)
    policy.max_model_len = len(env.reset()[0]["input_ids"][0]) + 40  # room for one turn, not for the reply
    run_episodes(policy, env, env.reset())
    for record in env.last_records:
        assert record.turns == 1 and not record.done
        assert record.info["outcome"] == "loss" and record.info["rewards"]["outcome"] == 0.0


def test_play_held_out_reports_the_oracle_per_opponent_like_evaluate_player(tokenizer):
    class Oracle(ScriptedIds):  # the minimax oracle in id form: reads its mark and the last board from the prompt
        player = Player(seed=0)

        def get_action(self, prompts, training=True, group_size=None):
            ids, masks = [], []
            for p in prompts:
                prompt = p["input_ids"][0].tolist()
                text = self.tokenizer.decode(prompt)
                rows = [line for line in text.splitlines() if re.fullmatch(r"\S \| \S \| \S", line)][-3:]
                board = "".join("." if c.isdigit() else c for line in rows for c in line.split(" | "))
                mark = "X" if "You play X" in text else "O"
                turn = self.tokenizer(self.player.completion(board, mark), add_special_tokens=False)["input_ids"]
                ids.append(torch.tensor([prompt + turn + [EOS]]))
                masks.append(torch.tensor([[False] * (len(prompt) - 1) + [True] * (len(turn) + 1)]))
            return ids, masks

    env = make_training_env(tokenizer, data_batch_size_per_gpu=4, test_games=10)
    stats = stats_from_records(play_held_out(Oracle(tokenizer), env))
    assert stats["optimal"].games == 10 and stats["optimal"].losses == 0 and stats["optimal"].invalid_games == 0
    assert stats["random"].games == 10 and stats["random"].losses == 0
