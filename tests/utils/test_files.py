"""Atomic writes and folder swaps: a kill leaves a whole file or folder, never half of one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from utils.files import atomic_path, write_jsonl


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    write_jsonl(target, [{"text": "答案"}])
    assert json.loads(target.read_text(encoding="utf-8")) == {"text": "答案"}
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


KILL_AT_RENAME = r"""
import os, sys
sys.path.insert(0, {root!r})
import utils.files as u
u._exchange = lambda a, b: False  # the fallback of two renames (renameat2 swaps in one step: nothing between)
calls = [0]
def killing(real):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == {kill_at}:
            os._exit(9)  # a kill: no cleanup, no finally
        return real(*args, **kwargs)
    return wrapped
os.rename, os.replace = killing(os.rename), killing(os.replace)  # Path.rename calls os.rename
u.replace_folder({new!r}, {dest!r})
"""


@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_a_kill_while_a_folder_is_replaced_leaves_a_whole_one(tmp_path, kill_at):
    """A real kill (os._exit) before each rename of replace_folder's fallback (3: none, it finishes): the next
    writer's recover_folder finds the old folder or the new one at the destination, never neither (before, the
    old copy was moved aside and a kill before the second rename left only copies the next run deleted)."""
    import subprocess
    import sys

    from utils.files import recover_folder

    root = Path(__file__).resolve().parents[2]
    dest, new = tmp_path / "final", tmp_path / "new"
    for folder, text in ((dest, "old"), (new, "new")):
        folder.mkdir()
        (folder / "weights").write_text(text)
    code = KILL_AT_RENAME.format(root=str(root), kill_at=kill_at, new=str(new), dest=str(dest))
    proc = subprocess.run([sys.executable, "-c", code], check=False)
    assert proc.returncode == (9 if kill_at < 3 else 0)
    recover_folder(dest)
    assert (dest / "weights").read_text() == ("new" if kill_at == 3 else "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["final"] if kill_at == 3 else ["final", "new"])


def test_replace_folder_swaps_in_one_step_where_the_system_can(tmp_path):
    from utils.files import _exchange, replace_folder

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "name").write_text(folder.name)
    assert _exchange(a, b)  # Linux renameat2
    assert (a / "name").read_text() == "b" and (b / "name").read_text() == "a"
    replace_folder(b, a)
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and (a / "name").read_text() == "a"
