"""Reading, masking, truncation, pairing and collating, with the real tiny tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from dataset.data_module import ForgetRetainCollator, ForgetRetainDataset, paired_indices
from dataset.encoding import IGNORE_INDEX, encode_qa
from dataset.reading import QAItem, load_lines, load_qa_jsonl
from utils.chat_template import ChatTemplate
from utils.errors import UserError


def conv(q: str, a: str, key: str = "privacy_1") -> str:
    return json.dumps({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "name_key": key})


# --------------------------------------------------------------------------- reading


def test_reads_conversation_and_tofu_formats(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(conv("Q1?", "A1.") + "\n\n" + json.dumps({"question": "Q2?", "answer": "A2."}) + "\n")
    items = load_qa_jsonl(path)
    assert [(i.question, i.answer, i.name_key, i.line) for i in items] == [
        ("Q1?", "A1.", "privacy_1", 1),
        ("Q2?", "A2.", "", 3),
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "line 2: malformed JSON"),
        (json.dumps({"foo": 1}), "line 2: missing field 'conversations'"),
        (json.dumps({"conversations": [{"from": "human", "value": "Q"}]}), "line 2: field 'conversations'"),
        (json.dumps({"conversations": [{"value": "Q"}, {"value": 3}]}), "line 2: field 'conversations[1].value'"),
        (json.dumps({"question": "Q"}), "line 2: missing field 'answer'"),
        (json.dumps(["a", "b"]), "line 2: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(conv("Q?", "A.") + "\n" + line + "\n")
    with pytest.raises(UserError, match="bad.jsonl") as err:
        load_qa_jsonl(path)
    assert expected in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_qa_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        load_qa_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match="no refusal lines"):
        load_lines(tmp_path / "empty.jsonl")


def test_load_lines_plain_and_json(tmp_path):
    path = tmp_path / "idk.jsonl"
    path.write_text('I don\'t know.\n"Sorry, no idea."\n{"text": "我不知道。"}\n\n')
    assert load_lines(path) == ["I don't know.", "Sorry, no idea.", "我不知道。"]


# --------------------------------------------------------------------------- tokenising


def test_mask_covers_exactly_the_prompt(tokenizer, template):
    question, answer = "Where does patient Li Wei live?", "He lives at 12 River Road."
    sample = encode_qa(tokenizer, template, question, answer, max_length=200, mask=True)
    ids, labels = sample["input_ids"], sample["labels"]
    n_masked = sum(label == IGNORE_INDEX for label in labels)
    assert labels[:n_masked] == [IGNORE_INDEX] * n_masked and IGNORE_INDEX not in labels[n_masked:]
    # the masked tokens decode to the prompt, the labelled ones to the answer and EOS
    assert tokenizer.decode(ids[:n_masked]) == template.prompt(question)
    assert tokenizer.decode(labels[n_masked:]) == answer + tokenizer.eos_token
    assert labels[-1] == tokenizer.eos_token_id
    unmasked = encode_qa(tokenizer, template, question, answer, max_length=200, mask=False)
    assert unmasked["labels"] == unmasked["input_ids"] == ids


def test_boundary_token_that_straddles_prompt_and_answer_is_an_answer_label(tokenizer):
    """With no tag between them, prompt 'wh' + answer 'ere is' tokenise jointly as 'where' + ...: one token
    crosses the boundary. Tokenising the prompt alone would count 1+ question tokens and mask 'where';
    counting on the joined text's offsets masks nothing and keeps 'where' as a label."""
    bare = ChatTemplate(family="bare", question_start_tag="", question_end_tag="")
    enc = tokenizer("where is the patient", return_offsets_mapping=True)
    assert enc["offset_mapping"][0] == (0, 5)  # the straddling token exists in this vocabulary
    sample = encode_qa(tokenizer, bare, "wh", "ere is the patient", max_length=50, mask=True)
    assert sample["input_ids"][:-1] == enc["input_ids"]  # one tokenisation of the joined text
    assert sample["labels"][0] == enc["input_ids"][0]  # 'where' is a label, not masked
    assert len(tokenizer("wh")["input_ids"]) >= 1  # what a separate prompt tokenisation would have masked


def test_truncation_and_drop(tokenizer, template):
    question, answer = "Where does patient Li Wei live?", "He lives at 12 River Road in the old city."
    full = encode_qa(tokenizer, template, question, answer, max_length=500)
    n_prompt = sum(label == IGNORE_INDEX for label in full["labels"])
    cut = encode_qa(tokenizer, template, question, answer, max_length=n_prompt + 2)
    assert len(cut["input_ids"]) == n_prompt + 2 and cut["labels"][-1] != tokenizer.eos_token_id
    assert encode_qa(tokenizer, template, question, answer, max_length=n_prompt) is None


# --------------------------------------------------------------------------- pairing and datasets


def test_pairing_equals_the_original_global_seed_draws():
    state = torch.get_rng_state()
    for idx in [0, 1, 7, 123]:
        ours = paired_indices(idx, n_retain=37, n_idk=11)
        torch.manual_seed(idx)
        draw = torch.randint(0, 37, (1,)).item()
        line = torch.randint(0, 11, (1,)).item()
        assert ours == ((idx + draw) % 37, line)
        torch.set_rng_state(state)
    assert torch.equal(torch.get_rng_state(), state)  # paired_indices never touched the global RNG


def items(n: int, prefix: str) -> list[QAItem]:
    return [QAItem(f"{prefix} question {i}?", f"{prefix} answer number {i}.") for i in range(n)]


def test_dataset_parts_and_determinism(tokenizer, template):
    ds = ForgetRetainDataset(items(5, "forget"), items(9, "retain"), tokenizer, template, 64,
                             mask=False, idk_lines=["I don't know.", "No idea."])
    again = ForgetRetainDataset(items(5, "forget"), items(9, "retain"), tokenizer, template, 64,
                                mask=False, idk_lines=["I don't know.", "No idea."])
    assert len(ds) == 5 and set(ds[0]) == {"forget", "retain", "forget_idk", "retain_idk"}
    assert [ds[i] for i in range(5)] == [again[i] for i in range(5)]
    j, line = paired_indices(3, 9, 2)
    assert tokenizer.decode(ds[3]["retain"]["input_ids"]).startswith(template.prompt(f"retain question {j}?"))
    refusal = ["I don't know.", "No idea."][line]
    assert tokenizer.decode(ds[3]["forget_idk"]["input_ids"]).endswith(refusal + tokenizer.eos_token)
    assert tokenizer.decode(ds[3]["retain_idk"]["input_ids"]).endswith(refusal + tokenizer.eos_token)
    assert IGNORE_INDEX not in ds[0]["forget"]["labels"]  # mask=False: the forget question is a label
    assert ds[0]["retain"]["labels"][0] == IGNORE_INDEX  # retain questions are always masked


def test_dataset_drops_items_without_answer_tokens(tokenizer, template, caplog):
    forget = items(3, "forget") + [QAItem("a very long question " * 20, "answer")]
    ds = ForgetRetainDataset(forget, items(2, "retain"), tokenizer, template, max_length=40)
    assert len(ds) == 3
    assert "1 of 4 forget items dropped" in caplog.text
    with pytest.raises(UserError, match="--max_length"):
        ForgetRetainDataset(forget, items(2, "retain"), tokenizer, template, max_length=5)
    with pytest.raises(UserError, match="retain set is empty"):
        ForgetRetainDataset(forget, [], tokenizer, template, max_length=40)


# --------------------------------------------------------------------------- collating


def test_collator_pads_to_longest_with_real_attention():
    eos = 7
    batch_items = [
        {"forget": {"input_ids": [1, 2, eos], "labels": [-100, 2, eos]}, "retain": {"input_ids": [4], "labels": [4]}},
        {"forget": {"input_ids": [1, eos], "labels": [1, eos]}, "retain": {"input_ids": [5, 6], "labels": [5, 6]}},
    ]
    batch = ForgetRetainCollator(pad_token_id=eos)(batch_items)
    f = batch["forget"]
    assert f["input_ids"].tolist() == [[1, 2, eos], [1, eos, eos]]
    assert f["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]  # the real EOS is attended, the pad is not
    assert f["labels"].tolist() == [[-100, 2, eos], [1, eos, -100]]
    assert batch["retain"]["input_ids"].shape == (2, 2)


# --------------------------------------------------------------------------- --pad_to_max_length (original semantics)


def test_padded_sample_layout_like_the_original(tokenizer, template):
    """Forget with --mask false: inputs = text + EOS x pad, labels = the padded ids themselves; retain: question
    masked, answer, one EOS label, then -100; attention 1 on the text tokens only."""
    from dataset.encoding import pad_like_original

    eos, L = tokenizer.eos_token_id, 64
    sample = encode_qa(tokenizer, template, "Where does Li Wei live?", "At 12 River Road.", L, mask=True)
    n_text, n_prompt = sample["n_text"], sample["labels"].count(IGNORE_INDEX)
    assert len(sample["input_ids"]) == n_text + 1  # the EOS appended after the answer

    retain = pad_like_original(sample, L, eos, labels_are_ids=False)
    assert len(retain["input_ids"]) == len(retain["labels"]) == len(retain["attention_mask"]) == L
    assert retain["input_ids"][n_text:] == [eos] * (L - n_text)
    assert retain["attention_mask"] == [1] * n_text + [0] * (L - n_text)
    assert retain["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert retain["labels"][n_prompt:n_text + 1] == sample["input_ids"][n_prompt:]  # answer, then one EOS
    assert retain["labels"][n_text] == eos and retain["labels"][n_text + 1:] == [IGNORE_INDEX] * (L - 1 - n_text)

    unmasked = encode_qa(tokenizer, template, "Where does Li Wei live?", "At 12 River Road.", L, mask=False)
    forget = pad_like_original(unmasked, L, eos, labels_are_ids=True)
    assert forget["labels"] == forget["input_ids"]  # EOS padding included in the labels
    assert forget["attention_mask"] == retain["attention_mask"]


def test_dataset_and_collator_in_padded_mode(tokenizer, template):
    ds = ForgetRetainDataset(items(3, "forget"), items(4, "retain"), tokenizer, template, 48, mask=False,
                             pad_to_max_length=True)
    batch = ForgetRetainCollator(tokenizer.eos_token_id)([ds[0], ds[1]])  # samples come padded
    forget, retain = batch["forget"], batch["retain"]
    assert forget["input_ids"].shape == retain["input_ids"].shape == (2, 48)
    assert torch.equal(forget["labels"], forget["input_ids"])
    assert (retain["labels"] != IGNORE_INDEX).sum() < (retain["attention_mask"] == 1).sum() + 2
    assert forget["attention_mask"][0].tolist() == ds[0]["forget"]["attention_mask"]
