"""Pairing forget items with retain (and refusal) items into a dataset, and collating batches of named parts.

A dataset item is a dict of named samples (``{"forget": ..., "retain": ...}``); the collator turns a list of items
into a dict of padded tensors per part (``batch["forget"]["input_ids"]`` of shape ``(B, T)``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from dataset.encoding import IGNORE_INDEX, encode_qa, pad_like_original
from dataset.reading import QAItem
from utils.chat_template import ChatTemplate
from utils.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["ForgetRetainCollator", "ForgetRetainDataset", "paired_indices"]


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
