"""Reading the inputs strictly: QA files (JSONL, conversation, ``messages`` or question/answer format), prediction
files and refusal files. A bad line is one error naming the file, the line and the field."""

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


_ROLES = ("system", "user", "assistant")


def _name_key(obj: dict, path: str | os.PathLike, line: int) -> str:
    name_key = obj.get("name_key", "")
    if not isinstance(name_key, str):
        raise _fail(path, line, "field 'name_key' must be a string")
    return name_key


def _parse_messages(obj: dict, path: str | os.PathLike, line: int, notes: dict[str, list[int]]) -> QAItem:
    """The Hugging Face chat format: the first user turn is the question, the next assistant turn the answer.

    System turns (anywhere) are accepted and not used: training formats each item with the model family's tags,
    not the chat template. A multi-turn item is not an error: its first user/assistant exchange is the item and the
    later turns are checked and left out (as the conversation format reads its first two turns). Both are noted in
    ``notes`` (``"system"``, ``"extra"``: line numbers) so that the file's reader warns once, not per line. Any other
    role, a non-string content, or a question without the assistant's answer right after it (system turns aside)
    is an error naming the file, the line and the field.
    """
    turns = obj["messages"]
    if not isinstance(turns, list) or not turns:
        raise _fail(path, line, "field 'messages' must be a non-empty list of turns ({'role', 'content'})")
    exchange: list[int] = []  # indices of the question turn and the answer turn
    extra = system = False
    for i, turn in enumerate(turns):
        field = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise _fail(path, line, f"field '{field}' must be an object with a 'role' and a 'content'")
        for key in ("role", "content"):
            if key not in turn:
                raise _fail(path, line, f"field '{field}' has no '{key}'")
        role = turn["role"]
        if role not in _ROLES:
            raise _fail(path, line, f"field '{field}.role' must be one of {', '.join(_ROLES)}, got {role!r}")
        if not isinstance(turn["content"], str):
            raise _fail(path, line, f"field '{field}.content' must be a string (a list of content parts is not "
                                    "supported)")
        if role == "system":
            system = True
        elif len(exchange) == 2:
            extra = True
        elif not exchange and role != "user":
            raise _fail(path, line, f"field '{field}': expected the first turn (after any system turn) to be the "
                                    f"user's question, got role {role!r}")
        elif exchange and role != "assistant":
            raise _fail(path, line, f"field '{field}': expected the assistant's answer after the user turn "
                                    f"messages[{exchange[0]}], got role {role!r}")
        else:
            exchange.append(i)
    if not exchange:
        raise _fail(path, line, "field 'messages' has no user turn")
    if len(exchange) == 1:
        raise _fail(path, line, f"field 'messages': no assistant turn after the user turn messages[{exchange[0]}]")
    if system:
        notes.setdefault("system", []).append(line)
    if extra:
        notes.setdefault("extra", []).append(line)
    q, a = exchange
    return QAItem(turns[q]["content"], turns[a]["content"], _name_key(obj, path, line), line)


def _parse_item(obj: object, path: str | os.PathLike, line: int, notes: dict[str, list[int]] | None = None) -> QAItem:
    """Accept the conversation format, the ``messages`` chat format or the TOFU ``question``/``answer`` format."""
    if not isinstance(obj, dict):
        raise _fail(path, line, f"expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj and "messages" in obj:
        raise _fail(path, line, "both fields 'conversations' and 'messages': give one")
    if "messages" in obj:
        return _parse_messages(obj, path, line, {} if notes is None else notes)
    if "conversations" in obj:
        turns = obj["conversations"]
        if not isinstance(turns, list) or len(turns) < 2:
            raise _fail(path, line, "field 'conversations' must be a list of at least two turns (human, gpt)")
        for i, turn in enumerate(turns[:2]):
            if not isinstance(turn, dict) or "value" not in turn:
                raise _fail(path, line, f"field 'conversations[{i}]' must be an object with a 'value'")
            if not isinstance(turn["value"], str):
                raise _fail(path, line, f"field 'conversations[{i}].value' must be a string")
        return QAItem(turns[0]["value"], turns[1]["value"], _name_key(obj, path, line), line)
    if "question" in obj or "answer" in obj:
        for key in ("question", "answer"):
            if key not in obj:
                raise _fail(path, line, f"missing field '{key}'")
            if not isinstance(obj[key], str):
                raise _fail(path, line, f"field '{key}' must be a string")
        name_key = obj.get("name_key", obj.get("task_id", ""))
        return QAItem(obj["question"], obj["answer"], str(name_key), line)
    raise _fail(path, line, "missing field 'conversations' or 'messages' (or 'question' and 'answer')")


def _warn_notes(path: str | os.PathLike, notes: dict[str, list[int]]) -> None:
    """One warning per kind and file for what the ``messages`` format reads but does not use."""
    if lines := notes.get("system"):
        logger.warning("%s: %d item(s) have a system turn (first on line %d); it is not used: training formats "
                       "the question and answer with the model family's tags (config/model_config.yaml) and "
                       "generation prompts are built from the question alone", path, len(lines), lines[0])
    if lines := notes.get("extra"):
        logger.warning("%s: %d item(s) have more than one user/assistant exchange (first on line %d); only the "
                       "first exchange is used", path, len(lines), lines[0])


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
    """Load QA items from a JSONL file (conversation, ``messages`` or TOFU format); errors name file, line and
    field. A ``messages`` item's system turns and later exchanges are left out, with one warning per file."""
    notes: dict[str, list[int]] = {}
    items = [_parse_item(obj, path, number, notes) for number, obj in iter_jsonl(path)]
    _warn_notes(path, notes)
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
