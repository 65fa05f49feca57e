"""TicTacToe: a multi-turn game against a seeded minimax opponent (``llm_gym/TicTacToe-v0``).

The environment and its card are in :mod:`~llm_gym.tasks.tictactoe.env`; the rules, the
opponent, the answer format and the scripted players (oracle and noisy teacher) in
:mod:`~llm_gym.tasks.tictactoe.game`; batched play for training (stratified opponent buckets),
SFT data from filtered games and evaluation in :mod:`~llm_gym.tasks.tictactoe.play`; the game as
the trainer's batched token-id env, multi-turn SFT examples and per-opponent results of a model in
:mod:`~llm_gym.tasks.tictactoe.training`, whose ``RECIPE`` (how ``llm-gym train`` trains the game) is
exported here for :func:`llm_gym.multi_turn.multi_turn_recipe`. Everything public is importable from
here. Importing this package registers the env.
"""

from llm_gym.registry import register_env
from llm_gym.tasks.tictactoe.env import (
    ENV_ID,
    OUTCOME_REWARDS,
    SYSTEM_PROMPT,
    TEST_FRACTION,
    TicTacToeConfig,
    TicTacToeEnv,
    format_reward,
    invalid_move_reward,
    make_rubric,
    outcome_reward,
)
from llm_gym.tasks.tictactoe.game import (
    EMPTY,
    Player,
    best_moves,
    free_cells,
    is_formatted,
    model_starts,
    move_tag,
    move_text,
    opponent_move,
    other,
    parse_move,
    place,
    render_board,
    winner,
)
from llm_gym.tasks.tictactoe.play import (
    OPPONENTS,
    GameRecord,
    GameSetup,
    GameStats,
    batch_options,
    evaluate_player,
    game_records,
    keep_for_sft,
    make_batch,
    play_games,
    sft_conversation,
    stats_table,
    stratified_setups,
    strength_buckets,
    teacher_conversations,
)
from llm_gym.tasks.tictactoe.training import (
    RECIPE,
    game_metrics,
    held_out_options,
    make_training_env,
    sft_examples,
    stats_from_records,
)

__all__ = [
    "EMPTY", "ENV_ID", "OPPONENTS", "OUTCOME_REWARDS", "RECIPE", "SYSTEM_PROMPT", "TEST_FRACTION",
    "GameRecord", "GameSetup", "GameStats", "Player", "TicTacToeConfig", "TicTacToeEnv",
    "batch_options", "best_moves", "evaluate_player", "format_reward", "free_cells", "game_records",
    "invalid_move_reward", "is_formatted", "keep_for_sft", "make_batch", "make_rubric", "model_starts", "move_tag",
    "move_text", "opponent_move", "other", "outcome_reward", "parse_move", "place", "play_games", "render_board",
    "sft_conversation", "stats_table", "game_metrics", "held_out_options", "make_training_env", "sft_examples",
    "stats_from_records", "stratified_setups", "strength_buckets", "teacher_conversations", "winner",
]

register_env(ENV_ID, "llm_gym.tasks.tictactoe.env:TicTacToeEnv")
