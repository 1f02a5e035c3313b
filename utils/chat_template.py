"""The chat-tag families of ``config/model_config.yaml``: how training formats a question and its answer for a
model family, read strictly (one error naming the file and field)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from utils.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL_CONFIG_PATH = PROJECT_ROOT / "config" / "model_config.yaml"


@dataclass(frozen=True)
class ChatTemplate:
    """The chat tags and loading options of one model family (``config/model_config.yaml``)."""

    family: str
    question_start_tag: str
    question_end_tag: str
    answer_tag: str = ""
    system_prompt: str | None = None
    hf_key: str | None = None
    aliases: tuple[str, ...] = ()
    trust_remote_code: bool = False
    attn_implementation: str | None = None

    def prompt(self, question: str) -> str:
        """The text that precedes the answer: system prompt, tags and question."""
        system = self.system_prompt or ""
        return f"{system}{self.question_start_tag}{question}{self.question_end_tag}{self.answer_tag}"


_TEMPLATE_KEYS = {f.name for f in fields(ChatTemplate)} - {"family"}
_REQUIRED_KEYS = {"question_start_tag", "question_end_tag"}


def load_yaml(path: str | os.PathLike) -> Any:
    """Read a YAML file; a missing file or a syntax error is a :class:`UserError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML: {err}") from None


def load_model_families(path: str | os.PathLike = MODEL_CONFIG_PATH) -> dict[str, ChatTemplate]:
    """Load every family of the model config, validating keys and types."""
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of family name -> settings")
    families: dict[str, ChatTemplate] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise UserError(f"{path}: family {name!r}: expected a mapping")
        unknown = set(entry) - _TEMPLATE_KEYS
        if unknown:
            allowed = sorted(_TEMPLATE_KEYS)
            raise UserError(f"{path}: family {name!r}: unknown keys {sorted(unknown)}; allowed: {allowed}")
        missing = _REQUIRED_KEYS - set(entry)
        if missing:
            raise UserError(f"{path}: family {name!r}: missing keys {sorted(missing)}")
        for key in ("question_start_tag", "question_end_tag", "answer_tag"):
            if key in entry and not isinstance(entry[key], str):
                raise UserError(f"{path}: family {name!r}: {key} must be a string")
        if not isinstance(entry.get("trust_remote_code", False), bool):
            raise UserError(f"{path}: family {name!r}: trust_remote_code must be a YAML boolean (true/false)")
        values = dict(entry)
        values["aliases"] = tuple(values.get("aliases") or ())
        values["answer_tag"] = values.get("answer_tag") or ""
        families[str(name)] = ChatTemplate(family=str(name), **values)
    return families


def missing_tag_tokens(template: ChatTemplate, tokenizer) -> list[str]:
    """Special tokens of the family's tags (``<|im_start|>``, ``<|eot_id|>``, Gemma's ``<start_of_turn>``, ...)
    that ``tokenizer`` does not know as single tokens: a sign that ``--model_family`` does not fit the model (its
    tags would be split into ordinary text pieces the model never saw as markers)."""
    import re

    tags = template.question_start_tag + template.question_end_tag + template.answer_tag
    vocab = tokenizer.get_vocab()
    return sorted({tok for tok in re.findall(r"<\|[^|<>]+\|>|<[a-z]+(?:_[a-z]+)+>", tags) if tok not in vocab})


def load_chat_template(family: str, path: str | os.PathLike = MODEL_CONFIG_PATH) -> ChatTemplate:
    """Return the chat template of ``family`` (a family name or one of its aliases)."""
    families = load_model_families(path)
    if family in families:
        return families[family]
    for template in families.values():
        if family in template.aliases:
            return template
    known = ", ".join(sorted(families))
    raise UserError(f"unknown model family {family!r} (in {path}); known families: {known}")
