"""Reading the inputs strictly: QA files (JSONL, conversation or question/answer format), prediction files and
refusal files. A bad line is one error naming the file, the line and the field."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["QAItem", "iter_jsonl", "load_lines", "load_predictions", "load_qa_jsonl"]


@dataclass(frozen=True)
class QAItem:
    """One question/answer pair and where it came from."""

    question: str
    answer: str
    name_key: str = ""
    line: int = 0


def _fail(path: str | os.PathLike, line: int, message: str) -> UserError:
    return UserError(f"{path}, line {line}: {message}")


def _parse_item(obj: object, path: str | os.PathLike, line: int) -> QAItem:
    """Accept the conversation format or the TOFU ``question``/``answer`` format."""
    if not isinstance(obj, dict):
        raise _fail(path, line, f"expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        turns = obj["conversations"]
        if not isinstance(turns, list) or len(turns) < 2:
            raise _fail(path, line, "field 'conversations' must be a list of at least two turns (human, gpt)")
        for i, turn in enumerate(turns[:2]):
            if not isinstance(turn, dict) or "value" not in turn:
                raise _fail(path, line, f"field 'conversations[{i}]' must be an object with a 'value'")
            if not isinstance(turn["value"], str):
                raise _fail(path, line, f"field 'conversations[{i}].value' must be a string")
        name_key = obj.get("name_key", "")
        if not isinstance(name_key, str):
            raise _fail(path, line, "field 'name_key' must be a string")
        return QAItem(turns[0]["value"], turns[1]["value"], name_key, line)
    if "question" in obj or "answer" in obj:
        for key in ("question", "answer"):
            if key not in obj:
                raise _fail(path, line, f"missing field '{key}'")
            if not isinstance(obj[key], str):
                raise _fail(path, line, f"field '{key}' must be a string")
        name_key = obj.get("name_key", obj.get("task_id", ""))
        return QAItem(obj["question"], obj["answer"], str(name_key), line)
    raise _fail(path, line, "missing field 'conversations' (or 'question' and 'answer')")


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    return path


def iter_jsonl(path: str | os.PathLike) -> list[tuple[int, object]]:
    """Parse a JSONL file strictly: ``(line_number, object)`` per non-blank line."""
    path = _existing(path)
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                rows.append((number, json.loads(text)))
            except json.JSONDecodeError as err:
                raise _fail(path, number, f"malformed JSON ({err.msg} at column {err.colno})") from None
    return rows


def load_qa_jsonl(path: str | os.PathLike, allow_empty: bool = False) -> list[QAItem]:
    """Load QA items from a JSONL file (conversation or TOFU format); errors name file, line and field."""
    items = [_parse_item(obj, path, number) for number, obj in iter_jsonl(path)]
    if not items and not allow_empty:
        raise UserError(f"{path}: no items (the file is empty)")
    return items


def load_qa_sets(paths: Mapping[str, str | os.PathLike | None]) -> dict[str, list[tuple[str, str]]]:
    """The (question, answer) pairs of each named set whose path is given (a None path leaves the set out)."""
    return {name: [(it.question, it.answer) for it in load_qa_jsonl(path)]
            for name, path in paths.items() if path}


def load_predictions(path: str | Path, data_path: str | Path | None = None, expected: int | None = None) -> list[str]:
    """Answers from a `{"text": ...}` JSONL file; errors name the file, line and field.

    With ``expected``, the file must hold exactly that many answers (one per question of ``data_path``).
    """
    answers = []
    for number, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f"{path}, line {number}: expected an object with a string field 'text'")
        answers.append(obj["text"])
    if expected is not None and len(answers) != expected:
        raise UserError(f"{path} has {len(answers)} answers but {data_path} has {expected} questions; "
                        "they must be line-aligned")
    return answers


def load_lines(path: str | os.PathLike) -> list[str]:
    """Load refusal sentences, one a line (plain text, or a JSON string / ``{"text": ...}`` per line)."""
    path = _existing(path)
    lines = []
    with path.open(encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            text = text.strip()
            if not text:
                continue
            if text[0] in '{"':
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError:
                    obj = text
                if isinstance(obj, dict):
                    if not isinstance(obj.get("text"), str):
                        raise _fail(path, number, "a JSON line must be a string or an object with a string 'text'")
                    obj = obj["text"]
                text = obj if isinstance(obj, str) else text
            lines.append(text)
    if not lines:
        raise UserError(f"{path}: no refusal lines (the file is empty)")
    return lines
