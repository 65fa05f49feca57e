"""A multi-turn env (TicTacToe) evaluated through an endpoint: one record per game, same numbers as local play."""

from __future__ import annotations

import json

import pytest

from llm_gym.chat_server import ChatServer, Reply, completion_body
from llm_gym.cli import main
from llm_gym.rollout_dataset import load_rollouts
from llm_gym.tasks.tictactoe import ENV_ID, best_moves, evaluate_player, move_text


def best_turn(board: str, mark: str) -> str:
    """A deterministic optimal player: the first best move (so both runs play the same games)."""
    return move_text("first best move", best_moves(board, mark)[0])


def board_of(text: str) -> str:
    """The 9-cell board (``.`` free) from a user message's rendered board."""
    rows = [line for line in text.splitlines() if line.count("|") == 2]
    cells = [c.strip() for row in rows[-3:] for c in row.split("|")]
    return "".join("." if c.isdigit() else c for c in cells)


class GameServer(ChatServer):
    """Plays ``best_turn`` on the board of the last user message; the very first request gets a 500."""

    def __init__(self) -> None:
        super().__init__(self._respond, "player")

    def _respond(self, body):
        if self.requests == 1:
            return Reply(status=500, body={"error": {"message": "cold start"}})
        messages = body["messages"]
        mark = "X" if "You play X" in messages[1]["content"] else "O"
        return Reply(body=completion_body("player", best_turn(board_of(messages[-1]["content"]), mark), 5, 3))


def _rows(out):
    return {line.split("|")[3].strip(): float(line.split("|")[4]) for line in out.splitlines()[2:] if "|" in line}


def test_games_through_an_endpoint_score_as_the_same_player_locally(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    n = 6
    with GameServer() as server:
        argv = ["eval", "--task", ENV_ID, "--base-url", server.base_url, "--model", "player", "-n", str(n),
                "--task-kwargs", "random_move_prob=1.0", "--backoff", "0.05", "--out", str(tmp_path / "o"),
                "--save-dataset", str(tmp_path / "ds")]  # fmt: skip
        assert main(argv) == 0
    rows = _rows(capsys.readouterr().out)
    local = evaluate_player(lambda obs, infos: [best_turn(i["board"], i["mark"]) for i in infos], num_games=n,
                            opponents={"random": 1.0}, seed=0, split="test")["random"]  # fmt: skip
    assert rows["rollouts"] == n and rows["failed requests"] == 0  # the 500 was retried
    assert rows["total"] == pytest.approx(round(local.mean_reward, 3), abs=1e-3)
    assert rows["exact accuracy"] == pytest.approx(round(local.win_rate, 3), abs=1e-3)
    assert rows["format"] == 1.0 and rows["invalid_move"] == 0.0
    assert rows["mean completion tokens"] == pytest.approx(3 * local.turns / n, abs=1e-3)  # 3 tokens a turn

    data = load_rollouts(tmp_path / "ds")
    assert sorted(data["problem_index"]) == list(range(n))
    for row in data:
        roles = [m["role"] for m in row["completion"]]
        assert roles[0] == roles[-1] == "assistant" and set(roles) == {"assistant", "user"}
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert row["correct"] == (row["problem_outcome"] == "win")  # info["outcome"], renamed beside the part
    records = [json.loads(x) for x in (tmp_path / "o" / "rollouts.jsonl").read_text().splitlines()]
    assert len(records) == n
    assert main(["data", "filter", str(tmp_path / "ds"), "--where", "correct and format == 1",
                 "--out", str(tmp_path / "wins")]) == 0  # fmt: skip
    assert f"kept {local.wins} of {n} rows" in capsys.readouterr().out

    # the games' dataset feeds SFT: one example per assistant turn, each prompt what the model saw then
    from transformers import AutoTokenizer

    from llm_gym.algorithms.sft import dataset_examples
    from llm_gym.tiny import tiny_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_path("tiny")))
    examples = dataset_examples(data, tokenizer)
    assert len(examples) == local.turns
    assert all(e.completion.startswith("<think>first best move</think><move>") for e in examples)


def test_a_multi_turn_env_saved_as_rollouts_without_a_model_names_the_fix(tmp_path, capsys):
    # plain `eval --task TicTacToe` plays the oracle (tests/test_cli.py); its rollouts need a model to record
    assert main(["eval", "--task", ENV_ID, "-n", "2", "--save-dataset", str(tmp_path / "games")]) == 2
    assert "is a multi-turn env with no oracle here: pass --model PATH" in capsys.readouterr().err
    assert not (tmp_path / "games").exists()


def test_a_local_model_plays_the_games_into_the_same_records_as_an_endpoint(tmp_path, capsys, monkeypatch):
    """The tiny model served over HTTP (greedy) and loaded locally (greedy) play the same games the same way."""
    from llm_gym.chat_server import model_responder
    from llm_gym.tiny import tiny_model_path

    monkeypatch.setenv("LLM_GYM_CACHE", str(tmp_path / "cache"))
    model = str(tiny_model_path("tiny"))
    common = ["eval", "--task", ENV_ID, "-n", "2", "--max-tokens", "6", "--task-kwargs", "max_turns=2"]
    assert main([*common, "--model", model, "--save-dataset", str(tmp_path / "local")]) == 0
    local = _rows(capsys.readouterr().out)
    with ChatServer(model_responder(model, "tiny"), "tiny") as server:
        assert main([*common, "--base-url", server.base_url, "--model", "tiny", "--temperature", "0",
                     "--save-dataset", str(tmp_path / "api"), "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    api = _rows(capsys.readouterr().out)
    assert local == api and local["rollouts"] == 2 and local["mean completion tokens"] > 0
    a, b = load_rollouts(tmp_path / "local"), load_rollouts(tmp_path / "api")
    assert a.column_names == b.column_names and a["completion"] == b["completion"]
    assert all(len(c) >= 3 for c in a["completion"])  # two model turns and the env's reply between them
    # lengths: one per game (not per turn): everything before its last turn, that turn, and the end of turn
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)

    def n_tokens(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    whole = [n_tokens(tok.apply_chat_template(list(p) + list(c[:-1]), tokenize=False, add_generation_prompt=True))
             + n_tokens(c[-1]["content"]) + 1 for p, c in zip(a["prompt"], a["completion"])]  # fmt: skip
    assert main(["data", "lengths", str(tmp_path / "local"), "--tokenizer", model, "--seq-len", "4096"]) == 0
    assert capsys.readouterr().out.startswith(f"2 conversations: longest {max(whole)} tokens")
