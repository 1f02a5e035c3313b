"""Per-token log-likelihood of labelled tokens: the one place both the training losses (`trainer.losses`) and
the evaluation metrics (`evals.tofu`) compute it.

Labels are aligned with the inputs (as a Hugging Face causal LM takes them): position ``t`` of the logits
predicts label ``t + 1``. Labels equal to ``IGNORE_INDEX`` count for nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataset.data_module import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "qa_batches", "sequence_nll", "shift_labels", "token_nll", "upcast"]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast to float32 for the reductions; float32/64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels moved one step left (``IGNORE_INDEX`` at the end): position t of the logits predicts label t + 1.

    Shifting the labels rather than slicing the logits keeps the logits a contiguous view: slicing them
    would copy ``B x T x V`` values forward and fill a zero ``B x T x V`` gradient backward.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (0 where ignored) and the mask of counted tokens, both ``(B, T)``."""
    target = shift_labels(labels)
    nll = F.cross_entropy(
        upcast(logits.reshape(-1, logits.size(-1))), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(target.shape)
    return nll, target != IGNORE_INDEX


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL of each sequence's counted tokens, shape ``(B,)`` (= -log p(answer | prompt))."""
    nll, _ = token_nll(logits, labels)
    return nll.sum(dim=-1)


def qa_batches(model, tokenizer, template, pairs, batch_size: int, max_length: int, shard=None):
    """(question, answer) pairs as training formats them (question masked), collated in batches on the
    model's device; yields ``(item indices, batch)``, only the batches ``shard`` (an :class:`evals.shard.Shard`)
    owns when given. A question that leaves no room for its answer is a :class:`~utils.utils.UserError`."""
    from dataset.data_module import ForgetRetainCollator, encode_qa
    from utils.utils import UserError

    samples = []
    for q, a in pairs:
        sample = encode_qa(tokenizer, template, q, a, max_length, mask=True)
        if sample is None:
            raise UserError(f"question longer than {max_length} tokens: {q[:80]!r}")
        samples.append({"x": sample})
    collate = ForgetRetainCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                   else tokenizer.eos_token_id)
    for number, start in enumerate(range(0, len(samples), batch_size)):
        if shard is not None and not shard.owns(number):
            continue
        batch = collate(samples[start : start + batch_size])["x"]
        yield range(start, start + len(batch["input_ids"])), {k: v.to(model.device) for k, v in batch.items()}
