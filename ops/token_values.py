"""Per-token values of logits: NLL and the competition's maximum entropy (ME), from logits or from the fused head
(:class:`ops.head.HeadInput`), with no ``batch x length x vocabulary`` temporary beyond one chunk of positions.

Labels are aligned with the inputs (as a Hugging Face causal LM takes them): position ``t`` of the logits
predicts label ``t + 1``. Labels equal to ``IGNORE_INDEX`` count for nothing. Training (`trainer.losses`) and
evaluation (`evals`) both compute their likelihoods here.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from dataset.encoding import IGNORE_INDEX
from ops.head import HeadInput, gathered

__all__ = ["HEAD_CHUNK_TOKENS", "ME_CHUNK_TOKENS", "ME_FLOOR", "head_row_values", "head_token_values", "me_chunk",
           "mean_max_entropy", "position_stats", "sequence_nll", "shift_labels", "token_nll", "upcast"]

# Positions per chunk of the fused head: bounds the float32 temporaries to HEAD_CHUNK_TOKENS x V at a time.
HEAD_CHUNK_TOKENS = 256


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast to float32 for the reductions; float32/64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels moved one step left (``IGNORE_INDEX`` at the end): position t of the logits predicts label t + 1.

    Shifting the labels rather than slicing the logits keeps the logits a contiguous view: slicing them
    would copy ``B x T x V`` values forward and fill a zero ``B x T x V`` gradient backward.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)

# The competition's ME: KL(uniform || softmax(z) + 1e-12), the floor inside the log. It caps each entry's -log p at
# 27.6 and gives every entry with p << 1e-12 no gradient; 0 is the exact closed form.
ME_FLOOR = 1e-12


def me_chunk(z: torch.Tensor, floor: float = ME_FLOOR, want_grad: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of logits ``z`` (C, V): ``KL(u || p + floor) = -log V - mean_v log(p_v + floor)`` with
    ``p = softmax(z)``, and its gradient with respect to ``z`` (C, V).

    With ``floor = 0`` this is ``logsumexp(z) - mean(z) - log V`` with gradient ``p - 1/V``. With a floor, writing
    ``r_v = p_v / (p_v + floor)`` and ``R = sum_v r_v``, the gradient is ``(p R - r) / V`` (the chain rule through
    the softmax): entries far below the floor have ``r ~ 0`` and no pull of their own. ``log(p + floor)`` is
    ``logaddexp(log p, log floor)``, exact for every p.
    """
    vocab = z.size(-1)
    logp = torch.log_softmax(z, dim=-1)
    if floor == 0:
        values = -logp.mean(dim=-1) - math.log(vocab)
        return values, (logp.exp_() - 1.0 / vocab) if want_grad else None
    lq = torch.logaddexp(logp, logp.new_tensor(math.log(floor)))
    values = -lq.mean(dim=-1) - math.log(vocab)
    if not want_grad:
        return values, None
    r = (logp - lq).exp_()
    total = r.sum(dim=-1, keepdim=True)
    grad = logp.exp_().mul_(total).sub_(r).div_(vocab)
    return values, grad


class _HeadTokenValues(torch.autograd.Function):
    """Per-row values of ``z = h W^T`` (rows of ``h`` are positions), ``z`` made ``HEAD_CHUNK_TOKENS`` rows at a
    time: ``nll`` = logsumexp(z) - z_y; ``me`` = KL(uniform || softmax(z) + floor) (:func:`me_chunk`).

    Each value's gradient with respect to its row of ``h`` (``(softmax(z) - onehot(y)) W``, or ME's logit gradient
    times ``W``) is made in the same pass and kept (``N x H``, small); backward scales it by the incoming per-row
    gradient. ``W`` must be frozen (no gradient is formed for it).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kind: str,
                floor: float = ME_FLOOR):
        values = torch.empty(hidden.size(0), dtype=upcast(hidden[:0]).dtype, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.size(0), HEAD_CHUNK_TOKENS):
            rows = slice(start, start + HEAD_CHUNK_TOKENS)
            # (C, V): the vocabulary-wide tensors, one chunk at a time
            z = upcast(hidden[rows] @ weight.t())
            if kind == "me":
                values[rows], probs = me_chunk(z, floor, grad is not None)
            else:
                z -= z.max(dim=-1, keepdim=True).values  # as log_softmax: exact where z is its maximum
                y = targets[rows]
                picked = z.gather(1, y.unsqueeze(1)).squeeze(1)
                probs = z.exp_()
                total = probs.sum(dim=-1)
                values[rows] = total.log() - picked
                if grad is not None:
                    probs /= total.unsqueeze(1)  # softmax(z)
                    probs[torch.arange(probs.size(0), device=probs.device), y] -= 1.0
            if grad is not None:
                grad[rows] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        return values

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_values.unsqueeze(1).to(grad.dtype), None, None, None, None


def head_token_values(head: HeadInput, labels: torch.Tensor, kind: str, floor: float = ME_FLOOR
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``nll`` or ``me`` (see :class:`_HeadTokenValues`) at the counted positions, as ``(B, T)`` values
    (0 elsewhere) and the counted mask, computed from ``head`` without whole logits."""
    target = shift_labels(labels)
    mask = target != IGNORE_INDEX
    flat = head.hidden.reshape(-1, head.hidden.size(-1))
    rows = mask.reshape(-1).nonzero().squeeze(1)
    with gathered(head.weight) as weight:
        values = _HeadTokenValues.apply(flat.index_select(0, rows), weight, target.reshape(-1)[rows], kind, floor)
    out = torch.zeros(target.shape, dtype=values.dtype, device=values.device)
    return out.index_put((mask,), values), mask


def head_row_values(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kind: str,
                    floor: float = ME_FLOOR) -> torch.Tensor:
    """Per-row ``nll`` or ``me`` of ``z = rows @ weight.T`` (rows are positions' head inputs, ``weight`` frozen and
    whole), with the gradient for ``rows``: :class:`_HeadTokenValues`."""
    return _HeadTokenValues.apply(rows, weight, targets, kind, floor)


# Tokens per chunk in the ME loss over logits: bounds the float32 temporaries to chunk x V at a time.
ME_CHUNK_TOKENS = 256


class _MaxEntropy(torch.autograd.Function):
    """Mean over counted positions of ME (:func:`me_chunk`), in chunks of positions.

    Forward keeps no copy of the logits; backward writes each position's logit gradient (divided by N) straight
    into one gradient tensor (the one autograd needs anyway), chunk by chunk, so the only ``x V`` temporaries are
    ``ME_CHUNK_TOKENS x V``.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, mask: torch.Tensor, floor: float) -> torch.Tensor:  # (B, T, V), (B, T)
        flat = logits.reshape(-1, logits.size(-1))  # a view: logits are contiguous
        rows = mask.reshape(-1).nonzero().squeeze(1)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start in range(0, rows.numel(), ME_CHUNK_TOKENS):
            z = upcast(flat.index_select(0, rows[start : start + ME_CHUNK_TOKENS]))
            total += me_chunk(z, floor, want_grad=False)[0].sum(dtype=torch.float64)
        ctx.save_for_backward(logits, rows)
        ctx.floor = floor
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
            _, chunk = me_chunk(upcast(flat.index_select(0, idx)), ctx.floor)
            flat_grad.index_copy_(0, idx, (chunk * scale).to(grad.dtype))
        return grad, None, None


def mean_max_entropy(logits: torch.Tensor, mask: torch.Tensor, floor: float = ME_FLOOR) -> torch.Tensor:
    """Mean ME (:func:`me_chunk`) over the positions of ``logits (B, T, V)`` where ``mask (B, T)`` is set, with its
    gradient: :class:`_MaxEntropy`, ``ME_CHUNK_TOKENS`` positions at a time."""
    return _MaxEntropy.apply(logits.contiguous(), mask, floor)


@torch.no_grad()
def position_stats(rows: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row (one position each): ``log p(target)``, the mean and standard deviation of ``log p`` under ``p``
    (Min-K%++'s moments) and the argmax, with ``p = softmax(z)``. ``rows`` are logits ``(N, V)``, or with the
    head's ``weight`` its input ``(N, H)``; either way only ``HEAD_CHUNK_TOKENS x V`` values exist at a time."""
    out = [torch.empty(rows.size(0), dtype=torch.float32, device=rows.device) for _ in range(3)]
    argmax = torch.empty(rows.size(0), dtype=torch.long, device=rows.device)
    with gathered(weight) if weight is not None else contextlib.nullcontext() as whole:
        for start in range(0, rows.size(0), HEAD_CHUNK_TOKENS):
            chunk = slice(start, start + HEAD_CHUNK_TOKENS)
            z = upcast(rows[chunk] @ whole.t() if whole is not None else rows[chunk]).float()
            argmax[chunk] = z.argmax(dim=-1)
            logp = torch.log_softmax(z, dim=-1)
            out[0][chunk] = logp.gather(1, targets[chunk].unsqueeze(1)).squeeze(1)
            p = logp.exp()
            mu = (p * logp).sum(-1)
            out[1][chunk] = mu
            out[2][chunk] = ((p * logp.square_()).sum(-1) - mu.square()).clamp(min=0).sqrt()
    return out[0], out[1], out[2], argmax


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
