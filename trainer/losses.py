"""Unlearning losses: pure functions of logits ``(B, T, V)`` and labels ``(B, T)``, plus the loss table.

Labels are aligned with the inputs (as a Hugging Face causal LM takes them); every function shifts
internally, so position ``t`` of the logits predicts label ``t + 1``. Labels equal to ``IGNORE_INDEX``
(-100) contribute nothing: neither padding nor masked questions ever enter a loss.

The trainer runs the forward passes; this module never sees a model. ``LOSSES`` maps each
``--loss_type`` to its forget term and optional retain term; a term names the batch parts it reads and
whether it needs reference logits (the model with its LoRA adapter disabled).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dataset.data_module import IGNORE_INDEX
from evals.logprobs import sequence_nll, shift_labels, token_nll, upcast

# Tokens per chunk in the ME loss: bounds the float32 temporaries to chunk x V at a time.
ME_CHUNK_TOKENS = 256


def nll_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL over all counted tokens of the batch (a Hugging Face causal-LM loss). GD and IDK use it."""
    nll, mask = token_nll(logits, labels)
    return nll.sum() / mask.sum().clamp(min=1)


def ga_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: the negated NLL."""
    return -nll_loss(logits, labels)


class _MaxEntropy(torch.autograd.Function):
    """Mean over counted positions of ``logsumexp(z) - mean(z)``, in chunks of positions.

    Forward keeps no copy of the logits; backward writes ``(softmax(z) - 1/V) / N`` straight into one
    gradient tensor (the one autograd needs anyway), chunk by chunk, so the only ``x V`` temporaries are
    ``ME_CHUNK_TOKENS x V``.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, T, V), (B, T)
        flat = logits.reshape(-1, logits.size(-1))  # a view: logits are contiguous
        rows = mask.reshape(-1).nonzero().squeeze(1)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start in range(0, rows.numel(), ME_CHUNK_TOKENS):
            z = upcast(flat.index_select(0, rows[start : start + ME_CHUNK_TOKENS]))
            total += (torch.logsumexp(z, dim=-1) - z.mean(dim=-1)).sum(dtype=torch.float64)
        ctx.save_for_backward(logits, rows)
        return (total / rows.numel()).to(upcast(logits[:0]).dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, rows = ctx.saved_tensors
        vocab = logits.size(-1)
        grad = torch.zeros_like(logits)
        flat_grad = grad.view(-1, vocab)
        flat = logits.reshape(-1, vocab)
        scale = grad_out / rows.numel()
        for start in range(0, rows.numel(), ME_CHUNK_TOKENS):
            idx = rows[start : start + ME_CHUNK_TOKENS]
            probs = torch.softmax(upcast(flat.index_select(0, idx)), dim=-1)
            flat_grad.index_copy_(0, idx, ((probs - 1.0 / vocab) * scale).to(grad.dtype))
        return grad, None


def me_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Maximum entropy: KL(uniform || softmax(logits)) averaged over counted tokens.

    In closed form, per position with logits ``z`` over ``V`` classes:
    ``KL(u || p) = sum_v (1/V)(log(1/V) - log p_v) = logsumexp(z) - mean(z) - log V``.
    No uniform tensor, softmax copy or extra ``B x T x V`` tensor is built: positions are processed
    ``ME_CHUNK_TOKENS`` at a time (see ``_MaxEntropy``).
    """
    mask = shift_labels(labels) != IGNORE_INDEX
    if not mask.any():
        return logits.sum() * 0.0
    return _MaxEntropy.apply(logits.contiguous(), mask) - math.log(logits.size(-1))


def ap_loss(
    retain_logits: torch.Tensor,
    retain_labels: torch.Tensor,
    idk_logits: torch.Tensor,
    idk_labels: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Answer preservation: ``-(1/beta) * mean log sigmoid(beta * (nll(idk) - nll(retain)))``.

    Prefers the true retain answer over a refusal to the same retain question (per sequence).
    """
    margin = sequence_nll(idk_logits, idk_labels) - sequence_nll(retain_logits, retain_labels)
    return -F.logsigmoid(beta * margin).mean() / beta


def npo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Negative preference optimisation: ``-(2/beta) * mean log sigmoid(beta * (nll - nll_ref))``."""
    margin = sequence_nll(logits, labels) - sequence_nll(ref_logits, labels).detach()
    return -F.logsigmoid(beta * margin).mean() * 2 / beta


def dpo_loss(
    forget_logits: torch.Tensor,
    forget_labels: torch.Tensor,
    idk_logits: torch.Tensor,
    idk_labels: torch.Tensor,
    ref_forget_logits: torch.Tensor,
    ref_idk_logits: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """DPO with the refusal preferred over the forget answer, against reference logits.

    ``-(2/beta) * mean log sigmoid(beta * ((logp_idk - logp_forget) - (ref_logp_idk - ref_logp_forget)))``
    with ``logp = -sequence_nll``.
    """
    pi = sequence_nll(forget_logits, forget_labels) - sequence_nll(idk_logits, idk_labels)
    ref = (sequence_nll(ref_forget_logits, forget_labels) - sequence_nll(ref_idk_logits, idk_labels)).detach()
    return -F.logsigmoid(beta * (pi - ref)).mean() * 2 / beta


def kl_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(ref || current) of the next-token distributions, averaged over counted tokens."""
    mask = shift_labels(labels) != IGNORE_INDEX
    if not mask.any():
        return logits.sum() * 0.0
    logp = F.log_softmax(upcast(logits[mask]), dim=-1)  # (N, V)
    ref_logp = F.log_softmax(upcast(ref_logits[mask]), dim=-1).detach()
    return F.kl_div(logp, ref_logp, reduction="sum", log_target=True) / mask.sum()


# --------------------------------------------------------------------------- the loss table


class PartOutput(NamedTuple):
    """What the trainer computed for one batch part: the model's logits, labels and reference logits."""

    logits: torch.Tensor
    labels: torch.Tensor
    ref_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class LossTerm:
    """One term of an objective: the batch parts it reads, whether it needs reference logits, and how."""

    parts: tuple[str, ...]
    needs_ref: bool
    compute: Callable[[Mapping[str, PartOutput], float], torch.Tensor]


GA = LossTerm(("forget",), False, lambda o, b: ga_loss(o["forget"].logits, o["forget"].labels))
ME = LossTerm(("forget",), False, lambda o, b: me_loss(o["forget"].logits, o["forget"].labels))
IDK = LossTerm(("forget_idk",), False, lambda o, b: nll_loss(o["forget_idk"].logits, o["forget_idk"].labels))
NPO = LossTerm(
    ("forget",), True, lambda o, b: npo_loss(o["forget"].logits, o["forget"].labels, o["forget"].ref_logits, b)
)
DPO = LossTerm(
    ("forget", "forget_idk"),
    True,
    lambda o, b: dpo_loss(
        o["forget"].logits, o["forget"].labels, o["forget_idk"].logits, o["forget_idk"].labels,
        o["forget"].ref_logits, o["forget_idk"].ref_logits, b,
    ),
)
GD = LossTerm(("retain",), False, lambda o, b: nll_loss(o["retain"].logits, o["retain"].labels))
KL = LossTerm(("retain",), True, lambda o, b: kl_loss(o["retain"].logits, o["retain"].ref_logits, o["retain"].labels))
AP = LossTerm(
    ("retain", "retain_idk"),
    False,
    lambda o, b: ap_loss(o["retain"].logits, o["retain"].labels, o["retain_idk"].logits, o["retain_idk"].labels, b),
)

# --loss_type -> (forget term, retain term or None)
LOSSES: dict[str, tuple[LossTerm, LossTerm | None]] = {
    "GA": (GA, None),
    "GA+GD": (GA, GD),
    "GA+KL": (GA, KL),
    "ME": (ME, None),
    "ME+GD": (ME, GD),
    "ME+KL": (ME, KL),
    "ME+AP": (ME, AP),
    "IDK": (IDK, None),
    "IDK+GD": (IDK, GD),
    "IDK+KL": (IDK, KL),
    "IDK+AP": (IDK, AP),
    "NPO": (NPO, None),
    "NPO+GD": (NPO, GD),
    "NPO+KL": (NPO, KL),
    "DPO": (DPO, None),
    "DPO+GD": (DPO, GD),
    "DPO+KL": (DPO, KL),
    "DPO+AP": (DPO, AP),
}

# parts that only exist when a refusal (IDK) file is given
IDK_PARTS = frozenset({"forget_idk", "retain_idk"})


def needs_idk(loss_type: str) -> bool:
    """Whether ``loss_type`` reads a refusal part (so an IDK file is required)."""
    return any(term is not None and IDK_PARTS & set(term.parts) for term in LOSSES[loss_type])
