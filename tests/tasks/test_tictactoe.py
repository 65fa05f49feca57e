"""TicTacToe-v0: the env's rules, the seeded opponent, rewards by hand, the oracle, batches, SFT data, evaluation."""

from __future__ import annotations

import time
import warnings
from collections import Counter

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

from llm_gym.episodes import EpisodeBatch, length_summary, play, turn_examples
from llm_gym.rubric import Rubric
from llm_gym.tasks.tictactoe import (
    ENV_ID,
    GameRecord,
    GameSetup,
    Player,
    TicTacToeConfig,
    TicTacToeEnv,
    batch_options,
    best_moves,
    evaluate_player,
    is_formatted,
    keep_for_sft,
    make_batch,
    make_rubric,
    opponent_move,
    parse_move,
    play_games,
    render_board,
    sft_conversation,
    stats_table,
    stratified_setups,
    strength_buckets,
    teacher_conversations,
)

GOOD = "<think>ok</think><move>{}</move>"


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded tiny model's tokenizer (ChatML template; its BPE has seen oracle games), built offline."""
    from transformers import AutoTokenizer

    from llm_gym.tiny import tiny_model_path

    return AutoTokenizer.from_pretrained(tiny_model_path("tiny", env_ids=["llm_gym/TicTacToe-v0"]))


def _game(mark: str, p: float, **kwargs) -> tuple[TicTacToeEnv, dict, dict]:
    """An env reset on the first train game where the model plays ``mark``, against strength ``p``."""
    env = TicTacToeEnv(**kwargs)
    for index in range(100):
        obs, info = env.reset(options={"index": index, "random_move_prob": p})
        if info["mark"] == mark:
            return env, obs, info
    raise AssertionError(f"no game with mark {mark}")


def _oracle_to_the_end(env: TicTacToeEnv, info: dict, player: Player | None = None) -> tuple[float, dict, int]:
    player, turns, reward = player or Player(seed=0), 0, 0.0
    while "outcome" not in info:
        _, reward, terminated, truncated, info = env.step(player.completion(info["board"], info["mark"]))
        turns += 1
    return reward, info, turns


# ------------------------------------------------------------------------------- Gymnasium API
@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_check_env_passes_without_warnings(tokenizer, with_tokenizer):
    kwargs = {"tokenizer": tokenizer} if with_tokenizer else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gym.make(ENV_ID, render_mode="ansi", **kwargs)
        env.reset(seed=1)
        env.step("<think>x</think><move>5</move>")
        check_env(env.unwrapped)
        check_env(gym.make(ENV_ID, max_turns=2, random_move_prob=0.0, split="test", size=5).unwrapped)
    assert [str(w.message) for w in caught] == []


def test_reset_shows_the_board_and_the_rules(tokenizer):
    env, obs, info = _game("X", 0.0, tokenizer=tokenizer)
    system, user = obs["messages"]
    assert system["role"] == "system" and "numbered 1 to 9, row by row from the top left" in system["content"]
    assert "<think>...</think>" in system["content"] and "<move>...</move>" in system["content"]
    assert user == {"role": "user", "content": (
        "New game. You play X and move first.\n\n1 | 2 | 3\n---------\n4 | 5 | 6\n---------\n7 | 8 | 9\n\n"
        "Free cells: 1, 2, 3, 4, 5, 6, 7, 8, 9. Your move.")}
    assert info == {"board": ".........", "mark": "X", "invalid_moves": 0}
    rendered = tokenizer.apply_chat_template(list(obs["messages"]), tokenize=False, add_generation_prompt=True)
    assert obs["prompt"] == rendered
    assert obs["prompt"].endswith("<|im_start|>assistant\n")
    assert env.observation_space.contains(obs)

    env, obs, info = _game("O", 0.0)
    assert info["board"].count("X") == 1 and info["board"].count(".") == 8  # the opponent's first move is on the board
    cell = info["board"].index("X") + 1
    assert obs["messages"][1]["content"].startswith(f"New game. You play O. Your opponent (X) played {cell}.\n\n")
    assert render_board(info["board"]) in obs["messages"][1]["content"]


def test_board_rendering_numbers_the_free_cells():
    assert render_board("X...O...X") == "X | 2 | 3\n---------\n4 | O | 6\n---------\n7 | 8 | X"


def test_who_starts_is_drawn_from_the_seed_about_half_the_time():
    env = TicTacToeEnv(size=400)
    marks = [env.reset(options={"index": i})[1]["mark"] for i in range(400)]
    assert 0.4 < marks.count("O") / 400 < 0.6
    assert marks == [env.reset(options={"index": i})[1]["mark"] for i in range(400)]


def test_step_errors_and_the_end_of_the_game():
    env = TicTacToeEnv()
    with pytest.raises(RuntimeError, match=r"^call reset\(\) before step\(\)$"):
        env.step("x")
    env, _, info = _game("X", 0.0)
    with pytest.raises(TypeError, match=r"^the action is the completion text \(str\), got int$"):
        env.step(5)
    _oracle_to_the_end(env, info)
    with pytest.raises(RuntimeError, match=r"^the game is over: call reset\(\) to start another$"):
        env.step(GOOD.format(1))


def test_bad_arguments_name_the_fix():
    with pytest.raises(TypeError, match=r"llm_gym/TicTacToe-v0 got unknown argument 'max_turn'; its knobs are \["):
        gym.make(ENV_ID, max_turn=3)
    with pytest.raises(ValueError, match=r"random_move_prob must be a probability or a \[low, high\] range"):
        TicTacToeEnv(random_move_prob=[0.5, 0.2])
    with pytest.raises(ValueError, match=r"^max_turns must be a positive integer, got 0$"):
        TicTacToeEnv(max_turns=0)
    with pytest.raises(ValueError, match=r"^split must be one of \('train', 'test'\), got 'val'$"):
        TicTacToeEnv(split="val")
    env = TicTacToeEnv()
    with pytest.raises(ValueError, match=r"^unknown reset option 'seed'; options: index, random_move_prob$"):
        env.reset(options={"seed": 3})
    with pytest.raises(ValueError, match=r"^random_move_prob must be in \[0, 1\], got 2$"):
        env.reset(options={"random_move_prob": 2})


def test_render_ansi():
    env = TicTacToeEnv(render_mode="ansi")
    assert env.render() is None
    _, info = env.reset(options={"index": 0})
    assert env.render() == f"{render_board(info['board'])}\nmodel: {info['mark']}, invalid moves: 0, in play"


# -------------------------------------------------------------------------------- the opponent
def test_minimax_knows_the_textbook_replies():
    assert best_moves(".........", "X") == (1, 2, 3, 4, 5, 6, 7, 8, 9)  # every opening draws
    assert best_moves("X........", "O") == (5,)  # against a corner only the centre holds
    assert best_moves("....X....", "O") == (1, 3, 7, 9)  # against the centre only a corner holds
    assert best_moves("X...O...X", "O") == (2, 4, 6, 8)  # opposite corners: an edge, never a corner
    assert best_moves("XX.OO....", "X") == (3,) and best_moves("XX.OO....", "O") == (6,)  # the quickest win
    assert best_moves("XX..O....", "O") == (3,)  # block
    with pytest.raises(ValueError, match=r"the game on board 'XXXOO....' is over"):
        best_moves("XXXOO....", "O")


def test_opponent_reply_depends_only_on_the_seed_and_the_board():
    board = "....X...."
    replies = [opponent_move(board, "O", episode_seed=s, random_move_prob=0.0) for s in range(60)]
    assert replies == [opponent_move(board, "O", episode_seed=s, random_move_prob=0.0) for s in range(60)]
    assert set(replies) == {1, 3, 7, 9}  # ties broken at random across seeds, never a losing edge
    openings = Counter(opponent_move("." * 9, "X", episode_seed=s, random_move_prob=0.0) for s in range(200))
    assert len(openings) == 9  # all nine openings are equally good
    random_replies = {opponent_move(board, "O", episode_seed=s, random_move_prob=1.0) for s in range(200)}
    assert random_replies == {1, 2, 3, 4, 6, 7, 8, 9}  # a random opponent also plays the losing edges


def test_replay_is_exact_for_the_same_seed_and_moves():
    player = Player(random_move_prob=0.5, malformed_prob=0.2, seed=3)
    first = TicTacToeEnv(seed=4)
    obs, info = first.reset(options={"index": 7, "random_move_prob": 0.5})
    trace, moves = [(obs, info)], []
    while "outcome" not in info:
        moves.append(player.completion(info["board"], info["mark"]))
        obs, reward, terminated, truncated, info = first.step(moves[-1])
        trace.append((obs, reward, terminated, truncated, info))
    again = TicTacToeEnv(seed=4)
    replay = [again.reset(options={"index": 7, "random_move_prob": 0.5})] + [again.step(m) for m in moves]
    assert replay == trace
    other_seed = TicTacToeEnv(seed=5)
    other_seed.reset(options={"index": 7, "random_move_prob": 0.5})
    assert other_seed.episode_seed != first.episode_seed


def test_held_out_games_never_share_a_seed_with_training_games():
    train, test = TicTacToeEnv(split="train"), TicTacToeEnv(split="test")
    train_seeds = {train.game(i)[0] for i in range(500)}
    test_seeds = {test.game(i)[0] for i in range(500)}
    assert len(train_seeds) == len(test_seeds) == 500 and not train_seeds & test_seeds


# ------------------------------------------------------------------------------ moves, rewards
def test_answer_format_and_move_parsing():
    assert parse_move("<think>a</think><move> 7 </move>") == 7
    assert parse_move("<move>1</move> then <move>2</move>") == 2  # the last move tag counts
    assert parse_move("<move>five</move>") is None and parse_move("I play 5") is None
    assert parse_move("<move>" * 10_000 + "3") is None
    assert is_formatted(" <think>I block 7.</think>\n<move>7</move>\n")
    assert not is_formatted("<move>7</move>")  # no reasoning
    assert not is_formatted("<think>a</think><move>7</move> and more")
    assert not is_formatted("<think>a <move>1</move></think><move>7</move>")
    assert not is_formatted("<think>a</think><move>seven</move>")


def test_invalid_moves_get_feedback_and_the_game_goes_on():
    env, obs, info = _game("X", 0.0)
    cases = [
        ("I play the centre.", "Invalid move: no <move>N</move> found. Try again."),
        ("<think>x</think><move>five</move>", "Invalid move: 'five' is not a cell number. Try again."),
        ("<think>x</think><move>12</move>", "Invalid move: 12 is not a cell (1-9). Try again."),
    ]
    for n, (action, feedback) in enumerate(cases, start=1):
        obs, reward, terminated, truncated, info = env.step(action)
        assert (reward, terminated, truncated) == (0.0, False, False)
        assert info == {"board": ".........", "mark": "X", "invalid_moves": n}
        assert obs["messages"][-2] == {"role": "assistant", "content": action}
        assert obs["messages"][-1]["content"].startswith(feedback + "\n\n1 | 2 | 3\n")
    obs, _, _, _, info = env.step(GOOD.format(5))
    taken = info["board"].index("O") + 1
    obs, reward, terminated, _, info = env.step(GOOD.format(taken))
    assert obs["messages"][-1]["content"].startswith(f"Invalid move: cell {taken} is taken. Try again.")
    assert info["invalid_moves"] == 4 and not terminated and info["board"].count(".") == 7


def test_rewards_of_scripted_games_by_hand():
    # Against the optimal opponent the oracle always draws: the board fills, X makes 5 moves, O 4.
    for mark, moves in (("X", 5), ("O", 4)):
        env, _, info = _game(mark, 0.0)
        reward, info, turns = _oracle_to_the_end(env, info)
        assert (info["outcome"], turns) == ("draw", moves)
        assert info["rewards"] == {"outcome": 0.5, "format": 1.0, "invalid_move": 0.0}
        assert reward == pytest.approx(0.5 + 0.2 * 1.0)  # 0.7

        # the same game with one unparsable turn first and one valid move without reasoning
        env, _, info = _game(mark, 0.0)
        env.step("no move")
        player = Player(seed=0)
        _, _, _, _, info = env.step(f"<move>{player.move(info['board'], mark)[0]}</move>")
        reward, info, turns = _oracle_to_the_end(env, info, player)
        assert info["outcome"] == "draw" and turns + 2 == moves + 1
        share = (moves - 1) / (moves + 1)  # two of the moves + 1 turns are badly formatted
        assert info["rewards"] == {"outcome": 0.5, "format": pytest.approx(share), "invalid_move": 1.0}
        assert reward == pytest.approx(0.5 + 0.2 * (moves - 1) / (moves + 1) - 0.1)  # X: 0.5333, O: 0.52
    # A win against the random opponent: 1.0 + 0.2.
    env = TicTacToeEnv()
    for index in range(50):
        _, info = env.reset(options={"index": index, "random_move_prob": 1.0})
        reward, info, _ = _oracle_to_the_end(env, info)
        if info["outcome"] == "win":
            break
    assert info["outcome"] == "win" and reward == pytest.approx(1.2)
    assert info["rewards"] == {"outcome": 1.0, "format": 1.0, "invalid_move": 0.0} and info["reward_errors"] == {}


def test_reward_weights_are_knobs():
    env, _, info = _game("X", 0.0, outcome_weight=2.0, format_weight=0.0, invalid_move_weight=-1.0)
    env.step("<move>x</move>")
    reward, info, _ = _oracle_to_the_end(env, info)
    assert info["outcome"] == "draw" and reward == pytest.approx(2.0 * 0.5 + 0.0 - 1.0)
    columns = {"outcome": "loss", "turns": ["a", GOOD.format(1)], "invalid_moves": 2}
    assert make_rubric(TicTacToeConfig()).score("", columns).total == pytest.approx(0.0 + 0.2 * 0.5 - 0.1)


def test_turn_cap_ends_the_game_as_a_loss():
    env, _, _ = _game("X", 0.0, max_turns=3)
    for _ in range(2):
        assert env.step("pass")[2:4] == (False, False)
    obs, reward, terminated, truncated, info = env.step("pass")
    assert (terminated, truncated, info["outcome"]) == (False, True, "loss")
    assert obs["messages"][-1]["content"].startswith(
        "Invalid move: no <move>N</move> found. Try again. Turn limit of 3 reached: you lose.\n\n"
    )
    assert "Free cells" not in obs["messages"][-1]["content"]
    assert reward == pytest.approx(0.0 + 0.2 * 0.0 - 0.1)
    # valid moves count as turns too: a game still running at the cap is lost
    env, _, info = _game("X", 0.0, max_turns=2)
    _, reward, terminated, truncated, info = env.step(GOOD.format(Player().move(info["board"], "X")[0]))
    assert not truncated
    _, reward, terminated, truncated, info = env.step(GOOD.format(Player().move(info["board"], "X")[0]))
    assert truncated and info["outcome"] == "loss" and reward == pytest.approx(0.2)


def test_reward_parts_run_under_the_rubric_time_limit():
    def stuck(completion, **_):
        while True:
            pass

    env, _, info = _game("X", 0.0)
    assert env.rubric.timeout == 5.0
    env.rubric = Rubric([stuck, make_rubric(env.config).funcs[0]], names=["stuck", "outcome"], timeout=0.2)
    start = time.monotonic()
    reward, info, _ = _oracle_to_the_end(env, info)
    assert time.monotonic() - start < 3.0
    assert info["rewards"] == {"stuck": 0.0, "outcome": 0.5} and reward == 0.5
    assert info["reward_errors"] == {"stuck": "timed out after 0.2s"} and env.rubric.failures["stuck"] == 1


# --------------------------------------------------------------------------- oracle and players
def test_the_oracle_never_loses():
    results = evaluate_player(Player(seed=1), num_games=300, seed=2)
    optimal, random = results["optimal"], results["random"]
    assert (optimal.games, optimal.draws, optimal.losses) == (300, 300, 0)  # optimal vs optimal: always a draw
    assert random.losses == 0 and random.wins > 200 and random.invalid_games == 0
    train = evaluate_player(Player(seed=1), num_games=200, split="train", opponents={"mixed": 0.5})["mixed"]
    assert train.losses == 0


def test_the_teacher_is_imperfect_and_its_games_filter_to_clean_ones():
    results = evaluate_player(Player.teacher(seed=0), num_games=300)
    assert results["optimal"].losses > 0 and results["optimal"].invalid_games > 0
    assert 0.0 < results["random"].invalid_move_rate < 0.1
    table = stats_table(results)
    assert table.splitlines()[0].split() == ["opponent", "games", "win", "%", "draw", "%", "loss", "%", "invalid",
                                             "games", "%", "invalid/turn", "%"]
    assert table.splitlines()[2].startswith("optimal      300")


def test_sft_filter_keeps_won_and_drawn_games_with_format_one():
    def record(outcome, fmt):
        rewards = {"outcome": {"win": 1.0, "draw": 0.5, "loss": 0.0}[outcome], "format": fmt, "invalid_move": 0.0}
        messages = ({"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"}, {"role": "user", "content": "end"})
        return GameRecord(messages, outcome, rewards, 0.0, 0, 1, "X", 0.0, False)

    records = [record("win", 1.0), record("draw", 1.0), record("loss", 1.0), record("win", 0.75), record("draw", 0.0)]
    assert keep_for_sft(records) == records[:2]
    assert sft_conversation(records[0]) == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                            {"role": "assistant", "content": "a"}]


def test_teacher_conversations_are_clean_games_on_the_train_split():
    records = play_games(Player.teacher(seed=5), stratified_setups(120, buckets=10, rng=5), split="train", seed=5)
    kept = keep_for_sft(records)
    assert 0 < len(kept) < len(records)
    conversations = teacher_conversations(120, teacher=Player.teacher(seed=5), seed=5)
    assert conversations == [sft_conversation(r) for r in kept]
    for conversation in conversations:
        turns = [m["content"] for m in conversation if m["role"] == "assistant"]
        assert conversation[-1]["role"] == "assistant" and all(map(is_formatted, turns))
        assert not any(m["content"].startswith("Invalid move") for m in conversation)


# ------------------------------------------------------------------------------ batches, lengths
def test_strength_buckets_and_stratified_setups():
    assert strength_buckets(4) == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    setups = stratified_setups(8, buckets=4, size=50, rng=0)
    assert len({s.index for s in setups}) == 8 and all(0 <= s.index < 50 for s in setups)
    for b, setup in enumerate(setups):  # two prompts per bucket, each inside its range
        low = [0.0, 0.25, 0.5, 0.75][b // 2]
        assert low <= setup.random_move_prob <= low + 0.25
    few = stratified_setups(3, buckets=[(0.0, 0.0), (0.1, 0.1), (0.5, 0.5), (0.6, 0.6), (1.0, 1.0), (0.9, 0.9)])
    assert [s.random_move_prob for s in few] == [0.0, 0.5, 1.0]  # fewer prompts than buckets: spread over all
    assert stratified_setups(8, rng=3) == stratified_setups(8, rng=3) != stratified_setups(8, rng=4)
    with pytest.raises(ValueError, match=r"buckets must be \[low, high\] ranges"):
        stratified_setups(2, buckets=[(0.5, 0.1)])


def test_a_batch_shares_each_prompts_game_and_opponent_across_its_group():
    setups = [GameSetup(3, 0.0), GameSetup(8, 1.0)]
    first, second = {"index": 3, "random_move_prob": 0.0}, {"index": 8, "random_move_prob": 1.0}
    assert batch_options(setups, 2) == [first, first, second, second]
    batch = make_batch(setups, group_size=3, seed=1)
    assert len(batch) == 6 and batch.active == list(range(6))
    envs = [env.unwrapped for env in batch.envs]
    for b in range(2):
        group = envs[3 * b : 3 * b + 3]
        assert len({(e.episode_seed, e.random_move_prob, e.mark) for e in group}) == 1
        assert batch.observations[3 * b] == batch.observations[3 * b + 2]
    assert envs[0].episode_seed != envs[3].episode_seed
    with pytest.raises(ValueError, match=r"^got 2 completions for 6 active episodes: pass one per index in batch"):
        batch.step(["a", "b"])
    batch.step(["no move"] * 6)  # every rollout is told off; none ends
    assert batch.active == list(range(6)) and [i["invalid_moves"] for i in batch.infos] == [1] * 6
    play(batch, Player(seed=0))
    assert batch.active == [] and all(d for d in batch.done)
    assert [i["outcome"] for i in batch.infos[:3]] == ["draw"] * 3  # the optimal opponent's group
    for info, turns, ret in zip(batch.infos, batch.turns, batch.returns, strict=True):  # one bad turn, then clean ones
        assert ret == pytest.approx(info["rewards"]["outcome"] + 0.2 * (turns - 1) / turns - 0.1)


def test_episode_batch_also_plays_single_turn_tasks():
    batch = EpisodeBatch([gym.make("llm_gym/Subtraction-v0", size=4) for _ in range(2)])
    batch.reset(seed=0)
    batch.step(["x", "y"])
    assert batch.active == [] and batch.turns == [1, 1]
    with pytest.raises(RuntimeError, match=r"^call reset\(\) before step\(\)$"):
        EpisodeBatch([TicTacToeEnv()]).step([])


def test_length_summary_and_turn_examples(tokenizer):
    conversations = teacher_conversations(20, seed=0)
    lengths = sorted(len(tokenizer.apply_chat_template(c, tokenize=True)["input_ids"]) for c in conversations)
    summary = length_summary(conversations, tokenizer, seq_len=lengths[9])
    fit = sum(n <= lengths[9] for n in lengths)
    assert (summary.count, summary.longest, summary.fit) == (len(lengths), lengths[-1], fit)
    assert str(summary) == (f"longest conversation {lengths[-1]} tokens (mean {sum(lengths) / len(lengths):.1f}); "
                            f"{100 * summary.fit / summary.count:.2f} % of {summary.count} fit in {lengths[9]}")
    pairs = turn_examples(conversations[0], tokenizer)
    turns = [m["content"] for m in conversations[0] if m["role"] == "assistant"]
    assert [c for _, c in pairs] == turns
    for (prompt, _), earlier in zip(pairs[1:], turns, strict=False):
        assert prompt.endswith("<|im_start|>assistant\n") and earlier in prompt


def test_the_embedded_tiny_tokenizer_fits_whole_games(tokenizer):
    summary = length_summary(teacher_conversations(200, seed=7), tokenizer, seq_len=700)
    assert summary.fit_fraction == 1.0 and summary.longest < 700 < tokenizer.model_max_length
