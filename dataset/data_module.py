"""Reading QA files, formatting them with chat tags, tokenising with label masks, pairing and collating.

A *sample* is ``{"input_ids": list[int], "labels": list[int]}``; a dataset item is a dict of named
samples (``{"forget": ..., "retain": ...}``); the collator turns a list of items into a dict of padded
tensors per part (``batch["forget"]["input_ids"]`` of shape ``(B, T)``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from utils.chat_template import ChatTemplate
from utils.errors import UserError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "QAItem",
    "load_qa_jsonl",
    "load_lines",
    "load_predictions",
    "encode_qa",
    "paired_indices",
    "ForgetRetainDataset",
    "ForgetRetainCollator",
]


@dataclass(frozen=True)
class QAItem:
    """One question/answer pair and where it came from."""

    question: str
    answer: str
    name_key: str = ""
    line: int = 0


# --------------------------------------------------------------------------- reading


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


# --------------------------------------------------------------------------- tokenising


def encode_text(tokenizer, text: str, **kwargs) -> list[int]:
    """``text``'s token ids with the tokenizer's special tokens (a BOS where the tokenizer adds one), unless the text
    already starts with its BOS token (a rendered chat template writes it): one BOS either way."""
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=special, **kwargs)["input_ids"]


def encode_qa(
    tokenizer,
    template: ChatTemplate,
    question: str,
    answer: str,
    max_length: int,
    mask: bool = True,
) -> dict[str, list[int]] | None:
    """Tokenise ``prompt + answer`` once and build labels; ``None`` when no answer token survives.

    The text is ``template.prompt(question) + answer``, tokenised in one call (special tokens such as a
    BOS added as the tokenizer does), truncated to ``max_length``; when room is left the tokenizer's
    EOS is appended as the answer's last label, so the model learns to stop.

    With ``mask=True`` the question's labels are ``IGNORE_INDEX``. Question tokens are counted on the
    joined text from the tokenizer's character offsets, not by tokenising the prompt alone: a BPE merge
    can cross the prompt/answer boundary, so a separate tokenisation of the prompt may give a different
    count. A token that straddles the boundary holds answer characters and is therefore kept as an
    answer label; only tokens lying wholly inside the prompt are masked.

    Returns:
        ``{"input_ids", "labels"}`` (lists of equal length), or ``None`` if truncation left no answer token.
    """
    prompt = template.prompt(question)
    bos = getattr(tokenizer, "bos_token", None)  # one BOS: the tokenizer's, unless the tags already write it
    enc = tokenizer(prompt + answer, add_special_tokens=not (bos and prompt.startswith(bos)),
                    return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    boundary = len(prompt)
    # tokens ending at or before the boundary are prompt tokens; special tokens have (0, 0) offsets
    n_prompt = 0
    for i, (start, end) in enumerate(offsets):
        if end > boundary or (start >= boundary and end > start):
            break
        n_prompt = i + 1
    ids = ids[:max_length]
    n_text = len(ids)
    if len(ids) < max_length and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if len(ids) <= n_prompt:
        return None
    labels = list(ids)
    if mask:
        labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
    return {"input_ids": ids, "labels": labels, "n_text": n_text}


def pad_like_original(sample: dict, max_length: int, eos_id: int, labels_are_ids: bool) -> dict:
    """Pad a sample to ``max_length`` with EOS the way the original scripts did (``--pad_to_max_length``).

    Inputs: the text tokens, then EOS up to ``max_length``; the attention mask is 1 on the text tokens
    only (0 on every EOS, the first included). Labels: with ``labels_are_ids`` (the forget part with
    ``--mask false``) the padded ids themselves, EOS padding included, so a loss averages over padding
    too; otherwise the sample's labels (question masked, answer, one EOS) followed by ``IGNORE_INDEX``.
    """
    ids = sample["input_ids"]
    pad = max_length - len(ids)
    padded = ids + [eos_id] * pad
    attention = [1] * sample["n_text"] + [0] * (max_length - sample["n_text"])
    labels = list(padded) if labels_are_ids else sample["labels"] + [IGNORE_INDEX] * pad
    return {"input_ids": padded, "labels": labels, "attention_mask": attention, "n_text": sample["n_text"]}


# --------------------------------------------------------------------------- pairing and datasets


def paired_indices(idx: int, n_retain: int, n_idk: int = 0) -> tuple[int, int | None]:
    """The retain index (and IDK line) paired with forget item ``idx``, as the original scripts chose them.

    A private generator seeded with ``idx`` draws ``randint(0, n_retain)``; the retain index is
    ``(idx + draw) % n_retain``, and the IDK line is the generator's next draw over ``n_idk`` lines.
    The values equal ``torch.manual_seed(idx)`` followed by the same draws, without touching the global
    RNG, so pairing is the same on every process and every run.
    """
    gen = torch.Generator().manual_seed(idx)
    retain_idx = (idx + int(torch.randint(0, n_retain, (1,), generator=gen).item())) % n_retain
    idk_idx = int(torch.randint(0, n_idk, (1,), generator=gen).item()) if n_idk else None
    return retain_idx, idk_idx


class ForgetRetainDataset(Dataset):
    """Forget items, each paired with a retain item (and, given refusals, IDK variants of both).

    Item ``i`` is a dict of named samples: ``forget`` (forget Q + its answer, question masked when
    ``mask``), ``retain`` (a retain Q + answer, question always masked) and, with ``idk_lines``,
    ``forget_idk`` (forget Q + a refusal) and ``retain_idk`` (the retain Q + the same refusal). Samples are
    tokenised once here. Items whose answer is cut away by ``max_length`` are dropped with a warning.
    With ``pad_to_max_length`` every sample is padded as the original scripts padded it
    (:func:`pad_like_original`).

    ``retain_sampling``: ``"fixed"`` pairs item ``i`` with the same retain item in every epoch
    (:func:`paired_indices`, the original scripts' rule: with more retain than forget items, most retain
    items are never seen). ``"random"`` draws afresh each epoch (:meth:`set_epoch`): a permutation of the
    retain items seeded by ``seed`` and the epoch, item ``i`` taking entry ``i mod n``. The draw depends on
    the item index, not on the process, so processes that hold different items in an epoch meet different
    retain items (all distinct while there are no more forget than retain items), and the pairing does not
    change with the number of processes.
    """

    def __init__(
        self,
        forget: Sequence[QAItem],
        retain: Sequence[QAItem],
        tokenizer,
        template: ChatTemplate,
        max_length: int,
        mask: bool = False,
        idk_lines: Sequence[str] | None = None,
        names: tuple[str, str] = ("forget", "retain"),
        pad_to_max_length: bool = False,
        retain_sampling: str = "fixed",
        seed: int = 0,
    ) -> None:
        if not forget:
            raise UserError(f"the {names[0]} set is empty")
        if not retain:
            raise UserError(f"the {names[1]} set is empty")
        if retain_sampling not in ("fixed", "random"):
            raise ValueError(f"retain_sampling must be 'fixed' or 'random', not {retain_sampling!r}")

        def encode_all(items: Sequence[QAItem], use_mask: bool, what: str) -> list[dict | None]:
            encoded = [encode_qa(tokenizer, template, it.question, it.answer, max_length, use_mask) for it in items]
            dropped = sum(e is None for e in encoded)
            if dropped == len(encoded):
                raise UserError(
                    f"every {what} item is longer than --max_length {max_length} before its answer starts; "
                    "raise --max_length"
                )
            if dropped:
                logger.warning("%d of %d %s items dropped: no answer token fits in --max_length %d",
                               dropped, len(encoded), what, max_length)
            return encoded

        forget_enc = encode_all(forget, mask, names[0])
        self._retain_enc = encode_all(retain, True, names[1])
        self._retain_ok = [i for i, e in enumerate(self._retain_enc) if e is not None]
        n_idk = len(idk_lines) if idk_lines else 0
        idk_cache: dict[tuple[int, int, int], dict | None] = {}  # (which set, item, refusal line)

        def idk_sample(items: Sequence[QAItem], i: int, line: int) -> dict | None:
            key = (id(items), i, line)
            if key not in idk_cache:
                idk_cache[key] = encode_qa(tokenizer, template, items[i].question, idk_lines[line], max_length, True)
            return idk_cache[key]

        self._retain_idk = (lambda i, line: idk_sample(retain, i, line)) if n_idk else None
        self._max_length, self._mask, self._eos = max_length, mask, tokenizer.eos_token_id
        self._pad = pad_to_max_length
        self.retain_sampling, self.seed, self.epoch = retain_sampling, seed, 0
        self._order: tuple[int, list[int]] | None = None  # (epoch, permutation) of the random draw

        self.items: list[dict[str, dict[str, list[int]]]] = []
        self._lines: list[int | None] = []  # each item's refusal line
        for idx, sample in enumerate(forget_enc):
            if sample is None:
                continue
            j, line = paired_indices(idx, len(self._retain_ok), n_idk)
            item = {"forget": sample, "retain": self._retain_enc[self._retain_ok[j]]}
            if n_idk:
                forget_idk = idk_sample(forget, idx, line)
                retain_idk = idk_sample(retain, self._retain_ok[j], line)
                if forget_idk is None or retain_idk is None:
                    continue
                item["forget_idk"] = forget_idk
                item["retain_idk"] = retain_idk
            self.items.append(self._padded(item))
            self._lines.append(line)
        if not self.items:
            raise UserError("no training items left after truncation; raise --max_length")

    def _padded(self, item: dict[str, dict]) -> dict[str, dict]:
        if not self._pad:
            return item
        return {part: pad_like_original(sample, self._max_length, self._eos,
                                        labels_are_ids=(part == "forget" and not self._mask))
                for part, sample in item.items()}

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose random retain draw ``__getitem__`` uses (called by the trainer each epoch)."""
        self.epoch = epoch

    def random_retain_index(self, idx: int) -> int:
        """Index into the retain file of the item drawn for forget item ``idx`` in the current epoch."""
        if self._order is None or self._order[0] != self.epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self._retain_ok), generator=gen).tolist())
        perm = self._order[1]
        return self._retain_ok[perm[idx % len(perm)]]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict[str, dict[str, list[int]]]:
        item = self.items[idx]
        if self.retain_sampling == "fixed":
            return item
        j = self.random_retain_index(idx)
        drawn = {"retain": self._retain_enc[j]}
        if self._retain_idk is not None:
            retain_idk = self._retain_idk(j, self._lines[idx])
            if retain_idk is None:  # this retain question leaves no room for the refusal: keep the fixed pair
                return item
            drawn["retain_idk"] = retain_idk
        return {**item, **self._padded(drawn)}

    def lengths(self) -> list[int]:
        """Total tokens of each item over all its parts (for length grouping; fixed pairs)."""
        return [sum(len(s["input_ids"]) for s in item.values()) for item in self.items]


# --------------------------------------------------------------------------- collating


class ForgetRetainCollator:
    """Pad every named part of a batch to its longest sample.

    Padding uses ``pad_token_id`` for inputs and ``IGNORE_INDEX`` for labels; the attention mask is built
    from the real lengths, so a pad token that equals EOS is still attended where it is real. A sample
    that brings its own ``attention_mask`` (``--pad_to_max_length``) keeps it.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, dict[str, list[int]]]]) -> dict[str, dict[str, torch.Tensor]]:
        batch: dict[str, dict[str, torch.Tensor]] = {}
        for part in items[0]:
            samples = [item[part] for item in items]
            lengths = [len(s["input_ids"]) for s in samples]
            width = max(lengths)
            input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
            labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
            attention = torch.zeros((len(samples), width), dtype=torch.long)
            for row, (sample, n) in enumerate(zip(samples, lengths, strict=True)):
                input_ids[row, :n] = torch.tensor(sample["input_ids"])
                labels[row, :n] = torch.tensor(sample["labels"])
                attention[row, :n] = torch.tensor(sample["attention_mask"]) if "attention_mask" in sample else 1
            batch[part] = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        return batch
