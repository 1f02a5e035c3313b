"""Per-token log-likelihood of labelled tokens: the one place both the training losses (`trainer.losses`) and
the evaluation metrics (`evals.tofu`) compute it.

Labels are aligned with the inputs (as a Hugging Face causal LM takes them): position ``t`` of the logits
predicts label ``t + 1``. Labels equal to ``IGNORE_INDEX`` count for nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from dataset.data_module import IGNORE_INDEX
from evals.shard import SINGLE, Shard

__all__ = ["FUSABLE_ARCHITECTURES", "IGNORE_INDEX", "HeadInput", "fusable_head", "head_input_taken",
           "head_token_values", "qa_batches", "sequence_nll", "shift_labels", "token_nll", "upcast"]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast to float32 for the reductions; float32/64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels moved one step left (``IGNORE_INDEX`` at the end): position t of the logits predicts label t + 1.

    Shifting the labels rather than slicing the logits keeps the logits a contiguous view: slicing them
    would copy ``B x T x V`` values forward and fill a zero ``B x T x V`` gradient backward.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)


# --------------------------------------------------------------------------- logits that are never built whole

# Positions per chunk of the fused head: bounds the float32 temporaries to HEAD_CHUNK_TOKENS x V at a time.
HEAD_CHUNK_TOKENS = 256


class HeadInput:
    """Logits ``(B, K, V)`` held as what makes them: the output head's input ``hidden (B, K, H)`` and its frozen
    weight ``(V, H)``. Per-token losses read them through :func:`token_nll` and :func:`head_token_values`,
    which run the head chunk by chunk, so neither the logits nor their gradient ever exist whole.

    Stands in for a logits tensor where a loss only needs per-token NLL or entropy-like values (the trainer
    decides, see ``LossTerm.fusable``): ``size`` reports the logits' shape, ``sum`` connects an empty
    selection's zero to the graph.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        self.hidden, self.weight = hidden, weight

    def size(self, dim: int | None = None):
        shape = torch.Size((*self.hidden.shape[:-1], self.weight.size(0)))
        return shape if dim is None else shape[dim]

    def sum(self) -> torch.Tensor:
        return self.hidden.sum()


# Architectures whose logits are exactly ``lm_head(hidden)`` (no soft-capping or scaling after the head): the
# fused head may stand in for their logits.
FUSABLE_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "mistral", "phi3", "qwen2_moe", "qwen3_moe"})


def fusable_head(model: torch.nn.Module | None) -> torch.nn.Linear | None:
    """The model's output head when per-token losses may be computed from its input (frozen, bias-free plain
    ``Linear``, whole on this process, an architecture in ``FUSABLE_ARCHITECTURES``), else ``None``."""
    if model is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if (type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad
            or head.weight.numel() == 0 or model_type not in FUSABLE_ARCHITECTURES):
        return None
    return head


@contextmanager
def head_input_taken(head: torch.nn.Linear) -> Iterator[list[torch.Tensor]]:
    """While active, every call of ``head`` records its input in the yielded list and computes one position
    only: the model's own logits shrink to ``B x 1 x V``; the recorded input makes a :class:`HeadInput`."""
    taken: list[torch.Tensor] = []

    def take(module, args):
        taken.append(args[0])
        return (args[0][..., :1, :], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        yield taken
    finally:
        handle.remove()


class _HeadTokenValues(torch.autograd.Function):
    """Per-row values of ``z = h W^T`` (rows of ``h`` are positions), ``z`` made ``HEAD_CHUNK_TOKENS`` rows at a
    time: ``nll`` = logsumexp(z) - z_y; ``me`` = logsumexp(z) - mean(z) - log V = KL(uniform || softmax(z)).

    Each value's gradient with respect to its row of ``h`` (``(softmax(z) - onehot(y)) W`` or
    ``(softmax(z) - 1/V) W``) is made in the same pass and kept (``N x H``, small); backward scales it by the
    incoming per-row gradient. ``W`` must be frozen (no gradient is formed for it).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kind: str):
        vocab = weight.size(0)
        values = torch.empty(hidden.size(0), dtype=upcast(hidden[:0]).dtype, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.size(0), HEAD_CHUNK_TOKENS):
            rows = slice(start, start + HEAD_CHUNK_TOKENS)
            # (C, V): the one vocabulary-wide tensor, one chunk at a time, reused in place throughout
            z = upcast(hidden[rows] @ weight.t())
            z -= z.max(dim=-1, keepdim=True).values  # as log_softmax: exact where z is its maximum
            if kind == "nll":
                y = targets[rows]
                picked = z.gather(1, y.unsqueeze(1)).squeeze(1)
            else:
                picked = z.mean(dim=-1) + math.log(vocab)
            probs = z.exp_()
            total = probs.sum(dim=-1)
            values[rows] = total.log() - picked
            if grad is not None:
                probs /= total.unsqueeze(1)  # softmax(z)
                if kind == "nll":
                    probs[torch.arange(probs.size(0), device=probs.device), y] -= 1.0
                else:
                    probs -= 1.0 / vocab
                grad[rows] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        return values

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_values.unsqueeze(1).to(grad.dtype), None, None, None


def head_token_values(head: HeadInput, labels: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``nll`` or ``me`` (see :class:`_HeadTokenValues`) at the counted positions, as ``(B, T)`` values
    (0 elsewhere) and the counted mask, computed from ``head`` without whole logits."""
    target = shift_labels(labels)
    mask = target != IGNORE_INDEX
    flat = head.hidden.reshape(-1, head.hidden.size(-1))
    rows = mask.reshape(-1).nonzero().squeeze(1)
    values = _HeadTokenValues.apply(flat.index_select(0, rows), head.weight, target.reshape(-1)[rows], kind)
    out = torch.zeros(target.shape, dtype=values.dtype, device=values.device)
    return out.index_put((mask,), values), mask


def token_nll(logits: torch.Tensor | HeadInput, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (0 where ignored) and the mask of counted tokens, both ``(B, T)``."""
    if isinstance(logits, HeadInput):
        return head_token_values(logits, labels, "nll")
    target = shift_labels(labels)
    nll = F.cross_entropy(
        upcast(logits.reshape(-1, logits.size(-1))), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(target.shape)
    return nll, target != IGNORE_INDEX


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL of each sequence's counted tokens, shape ``(B,)`` (= -log p(answer | prompt))."""
    nll, _ = token_nll(logits, labels)
    return nll.sum(dim=-1)


def qa_batches(model, tokenizer, template, pairs, batch_size: int, max_length: int, shard: Shard = SINGLE):
    """(question, answer) pairs as training formats them (question masked), collated in batches on the
    model's device; yields ``(item indices, batch)``, only the batches this process of ``shard`` owns. A
    question that leaves no room for its answer is a :class:`~utils.utils.UserError`."""
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
        if not shard.owns(number):
            continue
        batch = collate(samples[start : start + batch_size])["x"]
        yield range(start, start + len(batch["input_ids"])), {k: v.to(model.device) for k, v in batch.items()}
