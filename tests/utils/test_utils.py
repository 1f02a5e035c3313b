"""Config loading, boolean flags, atomic writes and the tiny model builder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from utils.utils import (
    MODEL_CONFIG_PATH,
    UserError,
    atomic_path,
    bool_arg,
    load_chat_template,
    load_model_families,
    str2bool,
    write_jsonl,
)


def test_required_families_and_tags():
    families = load_model_families()
    assert {"llama2-7b", "llama3-8b", "qwen2.5-8b", "tiny"} <= set(families)
    assert families["llama2-7b"].prompt("Q") == "[INST] Q [/INST]"
    assert families["qwen2.5-8b"].prompt("Q") == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert families["qwen2.5-8b"].system_prompt is None
    assert families["llama3-8b"].question_end_tag.startswith("<|eot_id|>")
    assert all(t.trust_remote_code is False for t in families.values())
    assert load_chat_template("qwen2_5").family == "qwen2.5-8b"  # the original's --model_type name


def test_unknown_family_lists_known_ones():
    with pytest.raises(UserError, match="unknown model family 'gpt5'.*llama2-7b.*qwen2.5-8b"):
        load_chat_template("gpt5")


def test_config_validation(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("fam:\n  question_start_tag: a\n  question_end_tag: b\n  colour: red\n")
    with pytest.raises(UserError, match="unknown keys \\['colour'\\]"):
        load_model_families(bad)
    bad.write_text("fam:\n  question_start_tag: a\n  question_end_tag: b\n  trust_remote_code: 'yes'\n")
    with pytest.raises(UserError, match="YAML boolean"):
        load_model_families(bad)
    assert MODEL_CONFIG_PATH.is_file()


@pytest.mark.parametrize(("text", "value"), [("false", False), ("False", False), ("0", False), ("true", True),
                                             ("YES", True)])
def test_str2bool(text, value):
    assert str2bool(text) is value


def test_bool_flag_parses_false_as_false():
    parser = argparse.ArgumentParser()
    bool_arg(parser.add_argument_group("g"), "--mask", False, "mask questions")
    assert parser.parse_args(["--mask", "false"]).mask is False
    assert parser.parse_args(["--mask", "true"]).mask is True
    assert parser.parse_args(["--mask"]).mask is True
    assert parser.parse_args([]).mask is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--mask", "maybe"])


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    write_jsonl(target, [{"text": "答案"}])
    assert json.loads(target.read_text(encoding="utf-8")) == {"text": "答案"}
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_tiny_model_reloads_as_it_was_built(tiny_model_dir, tokenizer, tiny_model):
    """The fixture folder reloads through the Auto classes into the model zoo.tiny builds (same logits as a fresh
    build with the same seed) and its generation stops at <|im_end|>."""
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["hidden_size"] // cfg["num_attention_heads"] >= 32
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tiny_model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    import torch

    from zoo.tiny import build_model

    ids = tokenizer("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, build_model(tokenizer, seed=0)(ids).logits)
        assert not torch.equal(tiny_model(ids).logits, build_model(tokenizer, seed=1)(ids).logits)


def test_reloaded_tokenizer_splits_like_the_built_one(tiny_model_dir, tokenizer):
    """AutoTokenizer reloads a qwen2 folder as Qwen2Tokenizer; it must tokenise exactly as the built one."""
    from zoo.tiny import build_tokenizer

    built = build_tokenizer()
    text = "The phone of Gao Fang is 170-7153-2424. 我不知道。\n<|im_start|>user\nHi<|im_end|>"
    assert built(text).input_ids == tokenizer(text).input_ids


def test_script_parser_errors_in_one_line_and_help_without_none_defaults(capsys):
    """An argument error is one line (exit 2, no usage block); --help shows no '(default: None)' for required
    or unset options and keeps a docstring command's line breaks in the epilog."""
    from utils.utils import ScriptParser, bool_arg

    doc = """Do a thing.

    python thing.py --a 1 \\
        --b 2
    """
    parser = ScriptParser(doc, prog="thing.py")
    parser.add_argument("--a", required=True, help="needed")
    parser.add_argument("--b", default=None, help="optional")
    parser.add_argument("--c", type=int, default=3, help="has one")
    bool_arg(parser, "--flag", False, "a switch")
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--a", "1", "--c", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "usage" not in err and "--c" in err
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: 3)" in text and "yes/no" in text
    assert "python thing.py --a 1 \\\n        --b 2" in text


KILL_AT_RENAME = r"""
import os, sys
sys.path.insert(0, {root!r})
import utils.utils as u
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

    from utils.utils import recover_folder

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
    from utils.utils import _exchange, replace_folder

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "name").write_text(folder.name)
    assert _exchange(a, b)  # Linux renameat2
    assert (a / "name").read_text() == "b" and (b / "name").read_text() == "a"
    replace_folder(b, a)
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and (a / "name").read_text() == "a"
