"""The docs cannot rot: the fidelity table's switches and tests exist, and every command example in the README and
docs/ parses with its script's own parser (arguments elided with ``...`` are left out; the options shown must
exist)."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FORGET_SCRIPTS = {"forget_me_gd": "me_gd", "forget_idk_ap": "idk_ap"}


def differences_rows() -> list[list[str]]:
    text = (ROOT / "docs" / "fidelity.md").read_text(encoding="utf-8")
    rows = [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in text.splitlines()
            if line.startswith("| ")]
    return [r for r in rows[1:] if not set(r[0]) <= {"-", " "}]  # past the header and its rule


def project_options() -> set[str]:
    """Every --option some script or argument group of the project defines."""
    found = set()
    paths = list(ROOT.glob("*.py"))
    for folder in ("trainer", "evals", "utils", "dataset"):
        paths += (ROOT / folder).rglob("*.py")
    for path in paths:
        for call in re.finditer(r"(?:add_argument|bool_arg)\((?:[^()]|\([^()]*\))*\)", path.read_text()):
            found |= set(re.findall(r"\"(--[a-z_0-9]+)\"", call.group(0)))
    return found


def test_every_switch_and_test_of_the_differences_table_exists():
    rows = differences_rows()
    assert len(rows) >= 15 and all(len(r) == 5 for r in rows), rows
    options = project_options()
    named = 0
    for where, _, _, switch, held_by in rows:
        for option in re.findall(r"`(--[a-z_0-9]+)", switch):
            assert option in options, (where, option)
            named += 1
        path, name = held_by.strip("`").split("::")
        assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), (where, held_by)
    assert named >= 12


def command_examples() -> list[tuple[str, str, list[str], bool, list[str]]]:
    """(doc, script, arguments, elided, launcher's config files) of every ``python SCRIPT.py`` / ``accelerate
    launch ... SCRIPT.py`` command of the docs' bash blocks (continuations joined, comments dropped)."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            for command in block.replace("\\\n", " ").splitlines():
                for part in re.split(r"&&|;", command.split(" #")[0]):
                    words = shlex.split(part)
                    at = next((i for i, w in enumerate(words) if re.fullmatch(r"[a-z_]+\.py", w)
                               and (ROOT / w).is_file()), None)
                    if at is None or "pip" in words:
                        continue
                    configs = [words[i + 1] for i in range(at) if words[i] == "--config_file"]
                    args = words[at + 1:]
                    found.append((doc.name, words[at][:-3], [a for a in args if a != "..."], "..." in args, configs))
    return found


EXAMPLES = command_examples()


def test_the_docs_show_commands_of_every_script():
    assert {"forget_me_gd", "merge", "predict_demo", "evaluate", "evaluate_unlearning", "evaluate_robustness",
            "evaluate_tofu", "extract_data", "demo", "fetch_model"} <= {example[1] for example in EXAMPLES}


def script_parser(script: str):
    """The script's own argument parser (the one its ``main`` parses with)."""
    if script in FORGET_SCRIPTS:
        from trainer.recipe import build_parser

        return build_parser(FORGET_SCRIPTS[script], "")
    module = importlib.import_module(script)
    captured = {}

    def stop(self, args=None, namespace=None):  # the parser parse_args builds, caught before it parses
        captured["parser"] = self
        raise StopIteration

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = stop
    try:
        module.parse_args([])
    except StopIteration:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


@pytest.mark.parametrize(("doc", "script", "args", "elided", "configs"), EXAMPLES,
                         ids=[f"{e[0]}:{e[1]}:{i}" for i, e in enumerate(EXAMPLES)])
def test_every_command_example_parses(doc, script, args, elided, configs):
    """A full example parses with the script's own parser as it is; an elided one (``...``) names only options its
    script has; a launcher's ``--config_file`` exists."""
    for config in configs:
        assert (ROOT / config).is_file(), (doc, config)
    parser = script_parser(script)
    if elided:
        unknown = [a for a in args if a.startswith("--") and a.split("=")[0] not in parser._option_string_actions]
        assert not unknown, (doc, script, unknown)
        return
    try:
        parser.parse_args(args)
    except SystemExit as exit_:
        pytest.fail(f"{doc}: `{script}.py {' '.join(args)}` does not parse (exit {exit_.code})")


def test_every_file_and_test_the_docs_name_exists():
    """A test or a test file named anywhere in the docs (``tests/x.py::test_y``) exists: moving or renaming one
    cannot leave a dead reference."""
    texts = [path.read_text(encoding="utf-8") for path in [*DOCS, ROOT / "bench" / "README.md"]]
    named = {m for text in texts for m in re.findall(r"(tests/[a-z_/]+\.py)(?:::(test_[a-z_0-9]+))?", text)}
    assert len(named) >= 20
    for path, name in named:
        assert (ROOT / path).is_file(), path
        if name:
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name}"
