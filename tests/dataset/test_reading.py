"""The ``messages`` chat format of dataset.reading: each shape, each error (file, line, field), one warning per
file for what it reads but does not use, and the same QAItems as the conversation format."""

from __future__ import annotations

import json
import logging

import pytest

from dataset.reading import load_qa_jsonl
from utils.errors import UserError


def msgs(*turns: tuple[str, object], **extra) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns], **extra})


def write(tmp_path, *lines: str, name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("line", "expected", "warns"),
    [
        (msgs(("user", "Q?"), ("assistant", "A.")), ("Q?", "A.", ""), []),
        (msgs(("user", "Q?"), ("assistant", "A."), name_key="privacy_3"), ("Q?", "A.", "privacy_3"), []),
        (msgs(("system", "Be brief."), ("user", "Q?"), ("assistant", "A.")), ("Q?", "A.", ""), ["system turn"]),
        # a system turn between the question and the answer is skipped, not the answer
        (msgs(("user", "Q?"), ("system", "S"), ("assistant", "A.")), ("Q?", "A.", ""), ["system turn"]),
        (msgs(("user", "Q?"), ("assistant", "A."), ("user", "Q2?"), ("assistant", "A2.")), ("Q?", "A.", ""),
         ["more than one user/assistant exchange"]),
        # a trailing question with no answer is a later exchange too: left out with the warning
        (msgs(("system", "S"), ("user", "Q?"), ("assistant", "A."), ("user", "Q2?")), ("Q?", "A.", ""),
         ["system turn", "more than one user/assistant exchange"]),
    ],
)
def test_messages_shapes(tmp_path, caplog, line, expected, warns):
    path = write(tmp_path, line)
    with caplog.at_level(logging.WARNING, logger="dataset.reading"):
        items = load_qa_jsonl(path)
    assert [(i.question, i.answer, i.name_key, i.line) for i in items] == [(*expected, 1)]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == len(warns)
    for message, word in zip(messages, warns, strict=True):
        assert word in message and str(path) in message


def test_one_warning_per_file_not_per_line(tmp_path, caplog):
    system = msgs(("system", "S"), ("user", "Q?"), ("assistant", "A."))
    multi = msgs(("user", "Q?"), ("assistant", "A."), ("user", "Q2?"), ("assistant", "A2."))
    plain = msgs(("user", "Q?"), ("assistant", "A."))
    path = write(tmp_path, plain, system, system, multi, system, multi)
    with caplog.at_level(logging.WARNING, logger="dataset.reading"):
        assert len(load_qa_jsonl(path)) == 6
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "3 item(s) have a system turn (first on line 2)" in messages[0]
    assert "2 item(s) have more than one user/assistant exchange (first on line 4)" in messages[1]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (json.dumps({"messages": "Q?"}), "field 'messages' must be a non-empty list"),
        (json.dumps({"messages": []}), "field 'messages' must be a non-empty list"),
        (json.dumps({"messages": [{"role": "user", "content": "Q?"}, "A."]}), "field 'messages[1]' must be an object"),
        (json.dumps({"messages": [{"role": "user", "content": "Q?"}, {"content": "A."}]}),
         "field 'messages[1]' has no 'role'"),
        (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "A."}]}),
         "field 'messages[0]' has no 'content'"),
        (msgs(("user", "Q?"), ("assistant", 3)), "field 'messages[1].content' must be a string"),
        (msgs(("user", [{"type": "text", "text": "Q?"}]), ("assistant", "A.")),
         "field 'messages[0].content' must be a string"),
        (msgs(("user", "Q?"), ("tool", "A.")), "field 'messages[1].role' must be one of system, user, assistant"),
        (msgs(("assistant", "A."), ("user", "Q?")), "field 'messages[0]': expected the first turn"),
        (msgs(("system", "S"), ("assistant", "A.")), "field 'messages[1]': expected the first turn"),
        (msgs(("user", "Q?"), ("user", "Q again?")), "field 'messages[1]': expected the assistant's answer after the "
                                                     "user turn messages[0]"),
        (msgs(("system", "S"), ("user", "Q?")), "field 'messages': no assistant turn after the user turn messages[1]"),
        (msgs(("system", "S")), "field 'messages' has no user turn"),
        (msgs(("user", "Q?"), ("assistant", "A."), name_key=7), "field 'name_key' must be a string"),
        (json.dumps({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                     "conversations": []}), "both fields 'conversations' and 'messages'"),
        # a later turn is checked too, though it is not used
        (msgs(("user", "Q?"), ("assistant", "A."), ("user", None)), "field 'messages[2].content' must be a string"),
    ],
)
def test_messages_errors_name_file_line_and_field(tmp_path, line, expected):
    path = write(tmp_path, msgs(("user", "Q?"), ("assistant", "A.")), "", line, name="bad.jsonl")
    with pytest.raises(UserError) as err:
        load_qa_jsonl(path)
    assert str(err.value).startswith(f"{path}, line 3: ")
    assert expected in str(err.value)


def test_missing_format_names_messages_too(tmp_path):
    with pytest.raises(UserError, match=r"line 1: missing field 'conversations' or 'messages'"):
        load_qa_jsonl(write(tmp_path, json.dumps({"prompt": "Q?"})))


def test_messages_and_conversations_files_give_identical_items(tmp_path):
    pairs = [("Where does patient Li Wei live?", "He lives at 12 River Road.", "privacy_1"),
             ("什么是光合作用？", "植物利用光能合成有机物的过程。", "noun_definition_2"),
             ("Q with \"quotes\"\nand a newline", "  spaced answer  ", "")]
    conversations = [json.dumps({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
                                 "name_key": k}, ensure_ascii=False) for q, a, k in pairs]
    messages = [msgs(("system", "You are helpful."), ("user", q), ("assistant", a), name_key=k) for q, a, k in pairs]
    from_conversations = load_qa_jsonl(write(tmp_path, *conversations, name="conv.jsonl"))
    from_messages = load_qa_jsonl(write(tmp_path, *messages, name="msgs.jsonl"))
    assert from_messages == from_conversations
    assert [(i.question, i.answer, i.name_key) for i in from_messages] == pairs
