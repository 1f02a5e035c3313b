"""extract_data.py on a hand-made file."""

from __future__ import annotations

import json
from pathlib import Path

import extract_data
from tests.conftest import run_script
from utils.files import write_jsonl


def conv(q: str, a: str, key: str) -> dict:
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "name_key": key}


def split_rows(tmp_path: Path) -> None:
    rows = [conv("Q1", "a b c d", "privacy_1"), conv("Q2", "a b c d", "privacy_2"),
            conv("Q3", "a b c d e", "privacy_3"), conv("Q4", "a b c d", "privacy_4"),
            conv("Q5", "【答案】A", "choice_1"), conv("Q6", "x y", "choice_2"), conv("Q7", "z w", "choice_3"),
            conv("Q8", "a b", "privacy_5"), conv("Q9", "c d", "privacy_6")]
    answers = ["a b c d", "a c d e", "a b q r s", "p q r s", "【答案】A", "nothing", "nada", "", "."]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "pred.jsonl", [{"text": a} for a in answers])


def test_private_items_never_go_to_retain(tmp_path, capsys, caplog):
    """The default --private_prefixes privacy: the private items the model does not reproduce (privacy_3 at
    ROUGE-L 0.4, privacy_4 at 0) go to neither file but to the side file, reported; the others as by the ROUGE
    rule. A user's own file with no privacy_ name gets a warning that nothing is protected."""
    split_rows(tmp_path)
    counts = extract_data.main(["--test_data", str(tmp_path / "train.jsonl"), "--user_out_path",
                                str(tmp_path / "pred.jsonl"), "--forget_out_path", str(tmp_path / "f.jsonl"),
                                "--retain_out_path", str(tmp_path / "r.jsonl"), "--keep_prefixes", "choice"])
    names = {f: [json.loads(x)["name_key"] for x in (tmp_path / f).read_text().splitlines()]
             for f in ("f.jsonl", "r.jsonl", "f.private_unknown.jsonl")}
    assert names == {"f.jsonl": ["privacy_1", "privacy_2"], "r.jsonl": ["choice_2", "choice_3"],
                     "f.private_unknown.jsonl": ["privacy_3", "privacy_4"]}
    assert counts == {"forget": 2, "retain": 2, "dropped": 1, "unscorable": 2, "private_unknown": 2}
    out = capsys.readouterr().out
    assert "2 private items the model does not know" in out and "f.private_unknown.jsonl" in out
    more = extract_data.main(["--test_data", str(tmp_path / "train.jsonl"), "--user_out_path",  # adds to privacy
                              str(tmp_path / "pred.jsonl"), "--forget_out_path", str(tmp_path / "f.jsonl"),
                              "--retain_out_path", str(tmp_path / "r.jsonl"), "--keep_prefixes", "choice",
                              "--private_prefixes", "zzz", "--overwrite"])
    assert more == counts

    own = [conv("Where does Ann live?", "Ann lives at 4 Elm Road.", "mine_1"),
           conv("What is the capital of France?", "The capital of France is Paris.", "keep_2"),
           conv("Who is Ann's doctor?", "Dr Olu Bassey.", "keep_3")]
    write_jsonl(tmp_path / "own.jsonl", own)
    write_jsonl(tmp_path / "own_pred.jsonl", [{"text": "I do not know."}, {"text": "The capital of France is Paris."},
                                              {"text": "I cannot say."}])
    argv = ["--test_data", str(tmp_path / "own.jsonl"), "--user_out_path", str(tmp_path / "own_pred.jsonl"),
            "--forget_out_path", str(tmp_path / "of.jsonl"), "--retain_out_path", str(tmp_path / "or.jsonl")]
    code, _ = run_script(extract_data, argv, capsys)
    assert code == 0 and "none is treated as private" in caplog.text
    assert len((tmp_path / "or.jsonl").read_text().splitlines()) == 2  # Ann's address is trained on: the warning
    caplog.clear()
    assert extract_data.main([*argv, "--private_prefixes", "mine", "--overwrite"])["private_unknown"] == 1
    assert "1 items outside --private_prefixes go to forget" in caplog.text and "keep" in caplog.text
    code, err = run_script(extract_data, [*argv, "--private_prefixes", "mine", "--keep_prefixes", "mine_"], capsys)
    assert code == 2 and "overlaps --private_prefixes" in err


def test_split_by_rouge_with_keep_prefixes(tmp_path, capsys):
    """The competition's rule (--private_prefixes with no value): ROUGE-L of each answer vs gold: 1.0 → forget;
    0.75 → forget; 0.4 (between) → dropped; 0 → retain; choice items (keep prefix) never go to forget: 1.0 > 0.8 →
    dropped, 0 → retain (one allowed by max_keep); answers ROUGE cannot score ('' and '.') are skipped, as the
    competition's script skipped them."""
    split_rows(tmp_path)
    counts = extract_data.main(["--test_data", str(tmp_path / "train.jsonl"), "--user_out_path",
                                str(tmp_path / "pred.jsonl"), "--forget_out_path", str(tmp_path / "f.jsonl"),
                                "--retain_out_path", str(tmp_path / "r.jsonl"), "--keep_prefixes", "choice",
                                "--max_keep", "1", "--private_prefixes"])
    forget = [json.loads(line)["name_key"] for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    retain = [json.loads(line)["name_key"] for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert forget == ["privacy_1", "privacy_2"]
    assert retain == ["privacy_4", "choice_2"]
    assert counts == {"forget": 2, "retain": 2, "dropped": 3, "unscorable": 2, "private_unknown": 0}
    assert not (tmp_path / "f.private_unknown.jsonl").exists()
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
                                                                         "noun_definition_99")) + "\n")
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
        "forget": 1, "retain": 1, "dropped": 0, "unscorable": 0, "private_unknown": 0}


def test_extract_rejects_misaligned_answers(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", [conv("Q", "A", "privacy_1")] * 2)
    write_jsonl(tmp_path / "pred.jsonl", [{"text": "A"}])
    code, err = run_script(extract_data, ["--test_data", str(tmp_path / "train.jsonl"), "--user_out_path",
                                          str(tmp_path / "pred.jsonl"), "--forget_out_path", str(tmp_path / "f.jsonl"),
                                          "--retain_out_path", str(tmp_path / "r.jsonl")], capsys)
    assert code == 2 and "has 1 answers" in err
    assert not (tmp_path / "f.jsonl").exists()
