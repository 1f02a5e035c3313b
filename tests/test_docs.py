"""The README's differences table: every switch it names exists as an option of a script, and every test it
names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def differences_rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Differences: from the original scripts", 1)[1].split("\n### ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in section.splitlines()
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
