"""Tokenising a question and its answer as training and evaluation format them: the family's chat tags, the
question masked out of the labels (``IGNORE_INDEX``), one EOS label, one BOS; and the original scripts' padding.

A *sample* is ``{"input_ids": list[int], "labels": list[int]}``."""

from __future__ import annotations

from utils.chat_template import ChatTemplate

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "encode_qa", "encode_text", "pad_like_original"]


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
