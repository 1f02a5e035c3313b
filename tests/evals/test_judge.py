"""The judge as a service against a small HTTP server of the test's own (no mock of the client): retries on 500,
a timeout that fires, a reply without </think>, every call recorded; a replay scores the same with no server;
an unreachable server or a wrong model name is one line before anything is written."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import evaluate
from evals.judge import ORDERS, combine
from tests.conftest import free_port, run_script
from tests.test_evaluate import conv
from utils.files import write_jsonl

MODEL = "judge-model"


class Scripted(BaseHTTPRequestHandler):
    """By the question in the judge message: 重试 fails twice with 500 then answers 输, 挂起 never answers in
    time, 无思考 answers without </think>, 坏 answers 200 with no choice, anything else answers 赢."""

    seen: list[dict] = []
    counts: dict[str, int] = {}

    def log_message(self, *args) -> None:  # quiet
        pass

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.reply(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "test"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Scripted.seen.append(body)
        text = body["messages"][0]["content"]
        key = next((k for k in ("重试", "挂起", "无思考", "坏") if k in text), "other")
        Scripted.counts[key] = Scripted.counts.get(key, 0) + 1
        if key == "重试" and Scripted.counts[key] <= 2:
            return self.reply(500, {"error": {"message": "overloaded", "type": "server_error"}})
        if key == "挂起":
            time.sleep(1.5)
        if key == "坏":  # 200, but no choice in it: a malformed reply
            return self.reply(200, {"id": "c", "object": "chat.completion", "created": 0, "model": MODEL,
                                    "choices": []})
        content = {"重试": "<think>想一想</think>输", "无思考": "回答1更好", "挂起": "</think>平"}.get(key,
                                                                                             "<think>…</think>赢")
        self.reply(200, {"id": "c", "object": "chat.completion", "created": 0, "model": MODEL,
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client that timed out and left: expected here
        pass


@pytest.fixture()
def server():
    Scripted.seen, Scripted.counts = [], {}
    httpd = QuietServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def qa_files(tmp_path) -> dict:
    valid = [conv("Q1", "alpha beta", "privacy_1"), conv("Q2", "x y", "noun_definition_1"),
             conv("Q3", "【答案】B", "choice_1"), conv("重试的问题", "g", "qa_1"), conv("挂起的问题", "g", "qa_2"),
             conv("无思考的问题", "g", "qa_3"), conv("普通问题", "g", "qa_4"), conv("坏的问题", "g", "qa_5")]
    paths = {"valid": tmp_path / "v.jsonl", "pred": tmp_path / "p.jsonl", "orig": tmp_path / "o.jsonl"}
    write_jsonl(paths["valid"], valid)
    write_jsonl(paths["pred"], [{"text": a} for a in ["zzz", "x y", "【答案】B", "新1", "新2", "新3", "新4", "新5"]])
    write_jsonl(paths["orig"], [{"text": a} for a in ["o", "o", "o", "原1", "原2", "原3", "原4", "原5"]])
    return paths


def args_for(paths: dict, out: Path, *extra: str) -> list[str]:
    return ["--model_name", MODEL, "--test_data", str(paths["valid"]), "--user_out_path", str(paths["pred"]),
            "--we_out_path", str(paths["orig"]), "--out_path", str(out), *extra]


def test_retries_timeouts_and_replies_without_think_are_counted_and_recorded(server, qa_files, tmp_path,
                                                                              monkeypatch):
    base, httpd = server
    monkeypatch.setenv("JUDGE_KEY", "sk-secret-never-written")
    out = tmp_path / "score.jsonl"
    record = evaluate.main(args_for(qa_files, out, "--judge_api_base", base, "--judge_api_key_env", "JUDGE_KEY",
                                    "--judge_timeout", "0.5", "--judge_retries", "2", "--judge_concurrency", "2",
                                    "--temperature", "0.6", "--top_k", "20"))
    judge = record["judge"]
    # 重试: win after two 500s; 挂起: every attempt times out -> failed; 无思考: a tie; 普通: 赢 -> loss;
    # 坏: a malformed reply -> failed, the other calls kept
    assert (judge["win"], judge["tie"], judge["loss"], judge["failed"]) == (1, 1, 1, 2)
    assert judge["calls"] == 5 and judge["failed_calls"] == 2 and judge["no_think"] == 1
    assert record["participant_win"] == pytest.approx(1 / 3)  # the failed item is out of the win rate
    assert Scripted.counts["重试"] == 3 and Scripted.counts["挂起"] == 3  # 1 + 2 retries each
    lines = [json.loads(x) for x in Path(f"{out}.judge.jsonl").read_text(encoding="utf-8").splitlines()]
    head, calls = lines[0], {c["request"]["messages"][0]["content"][:200]: c for c in lines[1:]}
    assert head["type"] == "header" and head["server_model"] == MODEL and head["sampling"]["top_k"] == 20
    by_q = {next(q for q in ("重试", "挂起", "无思考", "普通", "坏") if q in text): c for text, c in calls.items()}
    assert by_q["重试"]["attempts"] == 3 and by_q["重试"]["verdict"] == "win" and by_q["重试"]["latency_s"] > 0
    assert by_q["挂起"]["verdict"] is None and "Timeout" in by_q["挂起"]["error"]
    assert by_q["无思考"]["why"].startswith("no </think>") and by_q["坏"]["verdict"] is None
    assert by_q["普通"]["request"]["extra_body"] == {"top_k": 20} and by_q["普通"]["request"]["seed"] == 0
    assert Scripted.seen[0]["top_k"] == 20 and Scripted.seen[0]["model"] == MODEL  # extra_body reached the server
    assert "sk-secret" not in Path(f"{out}.judge.jsonl").read_text() + out.read_text()

    # replay: the server is gone, the score is the same
    httpd.shutdown()
    again = evaluate.main(args_for(qa_files, tmp_path / "again.jsonl", "--judge_replay", f"{out}.judge.jsonl"))
    assert again == record


def test_a_replay_refuses_another_prompt_unless_forced(server, qa_files, tmp_path, capsys):
    base, _ = server
    out = tmp_path / "score.jsonl"
    evaluate.main(args_for(qa_files, out, "--judge_api_base", base, "--judge_timeout", "0.5", "--judge_retries",
                           "0"))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("问题{}\n回答1{}\n回答2{}\n只输出一个字。", encoding="utf-8")
    replay = ["--judge_replay", f"{out}.judge.jsonl", "--judge_prompt", str(prompt)]
    code, err = run_script(evaluate, args_for(qa_files, tmp_path / "r.jsonl", *replay), capsys)
    assert code == 2 and "the judge prompt differs" in err and "--judge_replay_force" in err
    assert not (tmp_path / "r.jsonl").exists()
    code, err = run_script(evaluate, args_for(qa_files, tmp_path / "r.jsonl", *replay, "--judge_replay_force"),
                           capsys)
    assert code == 2 and "recorded message is not this run's" in err  # the messages themselves differ


def test_an_unreachable_server_or_a_wrong_model_is_one_line_before_any_output(server, qa_files, tmp_path, capsys):
    base, _ = server
    closed = free_port()
    out = tmp_path / "s.jsonl"
    code, err = run_script(evaluate, args_for(qa_files, out, "--judge_api_base", f"http://127.0.0.1:{closed}/v1",
                                              "--judge_retries", "0"), capsys)
    assert code == 2 and "cannot be reached" in err and "Traceback" not in err
    args = args_for(qa_files, out, "--judge_api_base", base)
    args[args.index(MODEL)] = "another-model"
    code, err = run_script(evaluate, args, capsys)
    assert code == 2 and "serves judge-model; pass one of them" in err
    no_judge = [a for a in args_for(qa_files, out, "--judge_api_base", base) if a not in ("--model_name", MODEL)]
    code, err = run_script(evaluate, no_judge, capsys)
    assert code == 2 and "--judge_api_base needs --model_name" in err
    assert not out.exists() and not Path(f"{out}.judge.jsonl").exists()


def test_both_orders_combine_and_report_the_position_bias():
    def row(i, order, verdict):
        return {"index": i, "order": order, "verdict": verdict, "reply": "</think>x", "why": ""}

    # a raw verdict is about the answer in slot 2 ("loss": the slot-1 answer won); swapped puts the unlearned
    # model's answer in slot 1
    rows = [row(0, ORDERS[0], "win"), row(0, ORDERS[1], "loss"),  # agree: the unlearned answer wins twice
            row(1, ORDERS[0], "loss"), row(1, ORDERS[1], "loss"),  # disagree: whichever is in slot 1 wins
            row(2, ORDERS[0], "tie"), row(2, ORDERS[1], None)]  # a failed call: not judged
    verdicts, counts = combine(rows)
    assert verdicts == {0: "win", 1: "tie"}
    assert counts["order_disagreements"] == 1 and counts["pairs_both_orders"] == 2
    assert counts["first_slot_win_rate"] == pytest.approx(3 / 4) and counts["failed_calls"] == 1
