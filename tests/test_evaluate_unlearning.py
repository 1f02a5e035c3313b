"""evaluate_unlearning.py's knowledge check end to end (a model that never saw the forget facts, and one that
memorised them, on the same forget file), and its docstring's example command (files of the repository)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import evaluate_unlearning

ROOT = Path(__file__).resolve().parents[1]


def check_run(model: Path, forget: Path, out: Path, capsys) -> tuple[dict, list[str]]:
    """The script on ``model`` and ``forget`` alone (no adapter, no GradNorm): summary.json's knowledge check and
    the printed lines."""
    evaluate_unlearning.main(["--model_path", str(model), "--model_family", "tiny", "--forget", str(forget),
                              "--max_new_tokens", "16", "--gradnorm", "false", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads((out / "summary.json").read_text())["knowledge_check"], lines


def test_a_model_that_never_saw_the_facts_is_told_there_is_nothing_to_unlearn(tiny_model_dir, target, tmp_path,
                                                                               capsys):
    """The untrained tiny model on the 16 private facts the target memorised: it knows none, and the last lines
    printed say plainly that unlearning has nothing to remove; summary.json holds the same verdict."""
    check, lines = check_run(tiny_model_dir, target["forget"], tmp_path / "untrained", capsys)
    assert check["verdict"] == "does_not_know" and check["known"] == 0 and check["items"] == 16
    assert check["mean_probability"] < 0.05 and check["reproduced"] == 0
    assert check["basis"] == "answer probabilities and greedy answers"
    verdict_line = next(line for line in lines if line.startswith("knowledge check:"))
    assert lines.index(verdict_line) > lines.index(next(x for x in lines if x.startswith("written to")))
    assert "knows 0 of 16 forget answers" in verdict_line
    assert "it does not know these facts, so unlearning has nothing to remove" in verdict_line
    assert verdict_line == check["message"]


def test_the_model_that_memorised_the_same_facts_knows_them(target, tmp_path, capsys):
    check, lines = check_run(target["model"], target["forget"], tmp_path / "target", capsys)
    assert check["verdict"] == "knows" and check["known"] == 16 and check["reproduced"] == 16
    assert check["mean_probability"] > 0.9
    assert lines[-1] == check["message"] and lines[-1].endswith("there is something to unlearn")


def docstring_command() -> list[str]:
    """The words of the first ``python evaluate_unlearning.py`` command of the script's docstring."""
    block = re.search(r"^ {4}python evaluate_unlearning\.py .*?(?:\n(?! {4})|\Z)", evaluate_unlearning.__doc__,
                      re.M | re.S)
    assert block, "no example command in the docstring"
    return shlex.split(block.group(0).replace("\\\n", " "))[2:]


def test_the_docstring_example_uses_files_of_the_repository():
    """A user reported that the example pointed to files that do not exist (models/target, data/holdout.jsonl):
    it parses, every set it names is a file the repository ships, its model is the folder fetch_model.py installs,
    and it runs without --adapter (the knowledge check before unlearning)."""
    from zoo.wheel_models import MODELS

    args = evaluate_unlearning.parse_args(docstring_command())
    sets = {name: getattr(args, name) for name in ("forget", "retain", "holdout", "general", "refusals")}
    assert sets["forget"]
    for name, path in sets.items():
        assert path is None or (ROOT / path).is_file(), (name, path)
    folder = Path(args.model_path)
    assert folder.parent == Path("models") and folder.name in MODELS, args.model_path
    assert args.adapter is None and args.retain_only_summary is None
