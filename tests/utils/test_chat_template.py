"""The model-family config: required families and tags, strict validation."""

from __future__ import annotations

import pytest

from utils.chat_template import MODEL_CONFIG_PATH, load_chat_template, load_model_families
from utils.errors import UserError


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
