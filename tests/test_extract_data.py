"""extract_data.py on a hand-made file."""

from __future__ import annotations

import json
from pathlib import Path

import extract_data
from tests.conftest import run_script
from utils.files import write_jsonl


def conv(q: str, a: str, key: str) -> dict:
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "name_key": key}


def test_split_by_rouge_with_keep_prefixes(tmp_path, capsys):
    """ROUGE-L of each answer vs gold: 1.0 → forget; 0.75 → forget; 0.4 (between) → dropped; 0 → retain;
    choice items (keep prefix) never go to forget: 1.0 > 0.8 → dropped, 0 → retain (one allowed by max_keep);
    answers ROUGE cannot score ('' and '.') are skipped, as the competition's script skipped them."""
    rows = [conv("Q1", "a b c d", "privacy_1"), conv("Q2", "a b c d", "privacy_2"),
            conv("Q3", "a b c d e", "privacy_3"), conv("Q4", "a b c d", "privacy_4"),
            conv("Q5", "【答案】A", "choice_1"), conv("Q6", "x y", "choice_2"), conv("Q7", "z w", "choice_3"),
            conv("Q8", "a b", "privacy_5"), conv("Q9", "c d", "privacy_6")]
    answers = ["a b c d", "a c d e", "a b q r s", "p q r s", "【答案】A", "nothing", "nada", "", "."]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "pred.jsonl", [{"text": a} for a in answers])
    counts = extract_data.main(["--test_data", str(tmp_path / "train.jsonl"), "--user_out_path",
                                str(tmp_path / "pred.jsonl"), "--forget_out_path", str(tmp_path / "f.jsonl"),
                                "--retain_out_path", str(tmp_path / "r.jsonl"), "--keep_prefixes", "choice",
                                "--max_keep", "1"])
    forget = [json.loads(line)["name_key"] for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    retain = [json.loads(line)["name_key"] for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert forget == ["privacy_1", "privacy_2"]
    assert retain == ["privacy_4", "choice_2"]
    assert counts == {"forget": 2, "retain": 2, "dropped": 3, "unscorable": 2}
    # lines are copied verbatim
    source = (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert (tmp_path / "f.jsonl").read_text(encoding="utf-8").splitlines() == source[:2]
    out = capsys.readouterr().out
    assert "privacy" in out and "choice" in out and "2 items skipped" in out


def test_extract_predicts_first_with_the_model(target, tmp_path):
    """--predict runs predict_demo's code path: the target model memorised its forget set, so all of it is
    forget (ROUGE-L 1.0); an item whose gold answer it cannot know (words it never saw) goes to retain."""
    data = tmp_path / "train.jsonl"
    data.write_text(Path(target["forget"]).read_text() + json.dumps(conv("Who painted it?", "zebra xylophone quartz",
                                                                         "privacy_99")) + "\n")
    counts = extract_data.main(["--test_data", str(data), "--user_out_path", str(tmp_path / "p.jsonl"),
                                "--forget_out_path", str(tmp_path / "f.jsonl"),
                                "--retain_out_path", str(tmp_path / "r.jsonl"), "--predict", "--model_path",
                                str(target["model"]), "--model_type", "tiny", "--max_new_tokens", "40",
                                "--backend", "transformers"])
    assert counts["forget"] == 16 and counts["retain"] == 1
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 17


def test_extract_refuses_an_empty_retain_set_and_existing_outputs(tmp_path, capsys):
    """Every choice item scores above --keep_threshold (the model answers them well): retain would be empty;
    that is an error and nothing is written. Existing outputs are kept without --overwrite."""
    rows = [conv("Q1", "a b c d", "privacy_1"), conv("Q2", "【答案】A", "choice_1")]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "pred.jsonl", [{"text": "a b c d"}, {"text": "【答案】A"}])
    argv = ["--test_data", str(tmp_path / "train.jsonl"), "--user_out_path", str(tmp_path / "pred.jsonl"),
            "--forget_out_path", str(tmp_path / "f.jsonl"), "--retain_out_path", str(tmp_path / "r.jsonl"),
            "--keep_prefixes", "choice"]
    code, err = run_script(extract_data, argv, capsys)
    assert code == 2 and "no item went to retain" in err
    assert not (tmp_path / "f.jsonl").exists() and not (tmp_path / "r.jsonl").exists()
    (tmp_path / "r.jsonl").write_text("mine\n")
    code, err = run_script(extract_data, [*argv, "--keep_threshold", "1.0"], capsys)
    assert code == 2 and "--retain_out_path" in err and "--overwrite" in err
    assert (tmp_path / "r.jsonl").read_text() == "mine\n"
    assert extract_data.main([*argv, "--keep_threshold", "1.0", "--overwrite"]) == {
        "forget": 1, "retain": 1, "dropped": 0, "unscorable": 0}


def test_extract_rejects_misaligned_answers(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", [conv("Q", "A", "privacy_1")] * 2)
    write_jsonl(tmp_path / "pred.jsonl", [{"text": "A"}])
    code, err = run_script(extract_data, ["--test_data", str(tmp_path / "train.jsonl"), "--user_out_path",
                                          str(tmp_path / "pred.jsonl"), "--forget_out_path", str(tmp_path / "f.jsonl"),
                                          "--retain_out_path", str(tmp_path / "r.jsonl")], capsys)
    assert code == 2 and "has 1 answers" in err
    assert not (tmp_path / "f.jsonl").exists()
