"""Unlearning losses: pure functions of logits ``(B, T, V)`` and labels ``(B, T)``, plus the loss table.

Labels are aligned with the inputs (as a Hugging Face causal LM takes them); every function shifts
internally, so position ``t`` of the logits predicts label ``t + 1``. Labels equal to ``IGNORE_INDEX``
(-100) contribute nothing: neither padding nor masked questions ever enter a loss.

The trainer runs the forward passes; this module never sees a model. ``LOSSES`` maps each
``--loss_type`` to its forget term and optional retain term; a term names the batch parts it reads and
whether it needs reference logits (the model with its LoRA adapter disabled) or hidden states (RMU, which
reads a layer's output rather than logits).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dataset.encoding import IGNORE_INDEX
from ops.head import HeadInput
from ops.token_values import (
    ME_FLOOR,
    head_token_values,
    mean_max_entropy,
    sequence_nll,
    shift_labels,
    token_nll,
    upcast,
)


@dataclass
class LossSettings:
    """Hyper-parameters of the terms as a user sets them; each default is its paper's (or open-unlearning's
    config). Declared once: :class:`~trainer.unlearn_trainer.UnlearnTrainingArguments` inherits these fields, so
    the Trainer saves them with the run."""

    beta: float = 0.1  # AP, NPO, DPO (the original scripts' value)
    simnpo_beta: float = 4.5
    simnpo_delta: float = 0.0
    undial_beta: float = 10.0
    wga_beta: float = 1.0
    satimp_beta1: float = 5.0
    satimp_beta2: float = 1.0
    ceu_skip_tokens: int = 1
    me_floor: float = ME_FLOOR  # ME's floor inside the log (the competition's 1e-12; 0: the exact closed form)
    kl_reduction: str = "tokens"  # KL's mean: over answer tokens, or open-unlearning's batchmean over positions


def nll_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL over all counted tokens of the batch (a Hugging Face causal-LM loss). GD and IDK use it."""
    nll, mask = token_nll(logits, labels)
    return nll.sum() / mask.sum().clamp(min=1)


def ga_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: the negated NLL."""
    return -nll_loss(logits, labels)


def me_loss(logits: torch.Tensor, labels: torch.Tensor, floor: float = LossSettings.me_floor) -> torch.Tensor:
    """Maximum entropy, as the competition computed it: ``KL(uniform || softmax(z) + floor)`` averaged over counted
    tokens, ``floor = 1e-12`` inside the log (``F.kl_div((softmax(z) + 1e-12).log(), uniform)``).

    Per position with logits ``z`` over ``V`` classes: ``-log V - mean_v log(p_v + floor)``. The floor caps each
    entry's ``-log p`` at ``-log floor = 27.6`` and takes the gradient of entries with ``p << floor`` away: on a
    memorised model, where most of the vocabulary is far below 1e-12, this changes the value and the gradient
    (see :func:`ops.token_values.me_chunk`). ``floor = 0`` (``--me_floor 0``) is the exact closed form
    ``logsumexp(z) - mean(z) - log V``. Hand value, V = 2, p = (3/4, 1/4), floor 0: ``-ln 2 - (ln 3/4 + ln 1/4)/2
    = ln(4/3)/2``. No uniform tensor, softmax copy or extra ``B x T x V`` tensor is built: positions are processed
    ``ME_CHUNK_TOKENS`` at a time (:func:`ops.token_values.mean_max_entropy`). Given a
    :class:`~ops.head.HeadInput` the logits are never built whole at all (the fused head).
    """
    mask = shift_labels(labels) != IGNORE_INDEX
    if not mask.any():
        return logits.sum() * 0.0
    if isinstance(logits, HeadInput):  # per-position values straight from the head's input, chunk by chunk
        values, mask = head_token_values(logits, labels, "me", floor)
        return (values.sum(dtype=torch.float64) / mask.sum()).to(values.dtype)
    return mean_max_entropy(logits, mask, floor)


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


def npo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor, beta: float = LossSettings.beta
             ) -> torch.Tensor:
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


KL_REDUCTIONS = ("tokens", "batchmean")


def kl_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
            reduction: str = LossSettings.kl_reduction) -> torch.Tensor:
    """KL(ref || current) of the next-token distributions.

    ``tokens``: averaged over the positions that predict an answer token (padding and prompts never count).
    ``batchmean``: summed over every position of the batch and divided by their number (``F.kl_div(...,
    reduction="batchmean")`` on the flattened ``(B*T, V)`` logits), as open-unlearning and closer-look compute it:
    prompt, padding and the last position count too, so the value moves with the batch's padding. Hand value:
    per-position KL (0, 0.2, 0.4, 1.0), positions 1 and 2 predicting answer tokens: 0.3 (tokens), 0.4 (batchmean).
    """
    if reduction == "batchmean":
        vocab = logits.size(-1)
        logp = F.log_softmax(upcast(logits.reshape(-1, vocab)), dim=-1)
        ref_logp = F.log_softmax(upcast(ref_logits.reshape(-1, vocab)), dim=-1).detach()
        return F.kl_div(logp, ref_logp, reduction="batchmean", log_target=True)
    if reduction != "tokens":
        raise ValueError(f"unknown KL reduction {reduction!r}; one of {', '.join(KL_REDUCTIONS)}")
    mask = shift_labels(labels) != IGNORE_INDEX
    if not mask.any():
        return logits.sum() * 0.0
    logp = F.log_softmax(upcast(logits[mask]), dim=-1)  # (N, V)
    ref_logp = F.log_softmax(upcast(ref_logits[mask]), dim=-1).detach()
    return F.kl_div(logp, ref_logp, reduction="sum", log_target=True) / mask.sum()


def simnpo_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float = LossSettings.simnpo_beta,
                delta: float = LossSettings.simnpo_delta) -> torch.Tensor:
    """SimNPO (Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
    Unlearning"): NPO without a reference model, on the length-normalised answer NLL.

    ``-(2/beta) * mean_rows log sigmoid(beta * (nll(y)/|y| - delta))`` with ``nll(y)`` the summed answer NLL
    of a row and ``|y|`` its counted tokens. Defaults beta = 4.5, delta = 0 (open-unlearning's TOFU config).
    Hand value: one row of 2 uniform binary tokens has nll/|y| = ln 2; with beta = 1, delta = 0 the loss is
    ``-2 log sigmoid(ln 2) = 2 ln(3/2)``.
    """
    nll, mask = token_nll(logits, labels)
    rows = mask.any(dim=-1)  # a row with nothing counted has no answer to normalise
    if not rows.any():
        return logits.sum() * 0.0
    per_token = nll.sum(dim=-1)[rows] / mask.sum(dim=-1)[rows]
    return -F.logsigmoid(beta * (per_token - delta)).mean() * 2 / beta


def _counted(logits: torch.Tensor, labels: torch.Tensor, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the counted positions ``(N, V)`` (upcast) and the labels they predict ``(N,)``, leaving out
    each row's first ``skip`` predicted tokens."""
    target = skip_first_answer_tokens(shift_labels(labels), skip) if skip else shift_labels(labels)
    mask = target != IGNORE_INDEX
    return upcast(logits[mask]), target[mask]


def undial_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor,
                beta: float = LossSettings.undial_beta) -> torch.Tensor:
    """UNDIAL (Dong et al. 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in
    Large Language Models"): cross-entropy of the model against ``softmax(z_ref - beta * onehot(y))``.

    The reference's logit of the true token is lowered by ``beta`` (default 10, open-unlearning's config)
    and the model distils the result, on counted (answer) positions only: unlike the reference
    implementation, prompt and padding positions never enter the mean and a -100 label never indexes the
    vocabulary. Hand value: uniform model and reference over 2 classes, beta = ln 3: the target is
    (3/4, 1/4) with the quarter on y, and the cross-entropy against a uniform model is ln 2.
    """
    z, y = _counted(logits, labels)
    if y.numel() == 0:
        return logits.sum() * 0.0
    ref = upcast(ref_logits[shift_labels(labels) != IGNORE_INDEX]).detach().clone()
    ref[torch.arange(y.numel(), device=y.device), y] -= beta
    target = torch.softmax(ref, dim=-1)
    return -(target * F.log_softmax(z, dim=-1)).sum(dim=-1).mean()


def _weighted_ascent(logits: torch.Tensor, labels: torch.Tensor, weight: Callable[[torch.Tensor], torch.Tensor]
                     ) -> torch.Tensor:
    """``-mean_counted(stop_grad(weight(p_t)) * nll_t)``: gradient ascent with per-token weights."""
    nll, mask = token_nll(logits, labels)
    if not mask.any():
        return logits.sum() * 0.0
    nll = nll[mask]
    w = weight(torch.exp(-nll.detach()))
    return -(w * nll).mean()


def wga_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float = LossSettings.wga_beta) -> torch.Tensor:
    """WGA, weighted gradient ascent (Wang et al. 2025, "Rethinking LLM Unlearning Objectives: A Gradient
    Perspective and Go Beyond"): each token's ascent term weighted by ``stop_grad(p(y_t) ** beta)``.

    Tokens the model already finds unlikely stop pulling, so ascent does not run away. Default beta = 1.
    Hand value: one binary token with p = 3/4, beta = 1: ``-(3/4) * ln(4/3)``.
    """
    return _weighted_ascent(logits, labels, lambda p: p**beta)


def satimp_loss(logits: torch.Tensor, labels: torch.Tensor, beta1: float = LossSettings.satimp_beta1,
                beta2: float = LossSettings.satimp_beta2) -> torch.Tensor:
    """SatImp (Yang et al. 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning"):
    as WGA with weight ``stop_grad(p ** beta1 * (1 - p) ** beta2)`` (defaults 5 and 1, open-unlearning).

    Hand value: one binary token with p = 1/2, beta1 = beta2 = 1: ``-(1/4) * ln 2``.
    """
    return _weighted_ascent(logits, labels, lambda p: p**beta1 * (1 - p) ** beta2)


def skip_first_answer_tokens(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Labels with each row's first ``n`` counted tokens set to ``IGNORE_INDEX`` (applied to the shifted
    labels, so it is the first ``n`` *predicted* tokens that drop out, whatever ``--mask`` counts)."""
    counted = labels != IGNORE_INDEX
    return labels.masked_fill(counted & (counted.cumsum(dim=-1) <= n), IGNORE_INDEX)


def ceu_loss(logits: torch.Tensor, labels: torch.Tensor, skip_tokens: int = LossSettings.ceu_skip_tokens
             ) -> torch.Tensor:
    """CE-U, cross-entropy unlearning (Yang 2025, "CE-U: Cross Entropy Unlearning"): cross-entropy against
    ``softmax(z)`` with the true token's logit set to ``-inf`` (a detached target), mean over counted tokens.

    The first ``skip_tokens`` answer tokens of each row are left out (the paper's footnote; default 1, as
    open-unlearning). Hand value: logits (0, ln 3, 0) with y = 1: the target is (1/2, 0, 1/2), the model's
    p = (1/5, 3/5, 1/5), so the loss is ``-(1/2 ln 1/5 + 1/2 ln 1/5) = ln 5``.
    """
    z, y = _counted(logits, labels, skip_tokens)
    if y.numel() == 0:
        return logits.sum() * 0.0
    target_logits = z.detach().clone()
    target_logits[torch.arange(y.numel(), device=y.device), y] = float("-inf")
    target = torch.softmax(target_logits, dim=-1)
    return -(target * F.log_softmax(z, dim=-1)).sum(dim=-1).mean()


def pdu_forget_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PDU's forget term (Entesari et al. 2025, "Constrained Entropic Unlearning: A Primal-Dual Framework for
    Large Language Models"): ``mean_counted (max_v z_v - mean_v z_v) ** 2``, the squared logit margin, which
    is 0 exactly when the next-token distribution is uniform.

    Counted positions are those that predict an answer token (the shift applied): the reference
    implementation reads the logits one position late. Hand value: logits (0, ln 3): margin ln(3)/2,
    loss ``ln(3)**2 / 4``.
    """
    z, _ = _counted(logits, labels)
    if z.numel() == 0:
        return logits.sum() * 0.0
    return ((z.max(dim=-1).values - z.mean(dim=-1)) ** 2).mean()


def dual_step(weight: float, retain_loss: float, epsilon: float, step_size: float) -> float:
    """PDU's dual ascent on the retain weight: ``max(0, weight + step_size * (retain_loss - epsilon))``.

    The weight grows while the retain loss breaks its bound ``epsilon`` and shrinks (never below 0) once
    it holds.
    """
    return max(0.0, weight + step_size * (retain_loss - epsilon))


def rmu_loss(hidden: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """RMU's activation distance (Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use
    with Unlearning"): per row, the mean over counted tokens of the mean squared difference over the hidden
    dimension, averaged over rows.

    ``hidden`` is ``(B, T, H)`` (a layer's output); ``target`` broadcasts to it: ``c * u`` for the forget
    term (u a fixed random unit vector, c the steering coefficient), the reference model's hidden states
    for the retain term. Counted tokens are those with a label (no shift: a hidden state belongs to its
    own token). Hand value: H = 2, hidden (1, 3) at one counted token, target (0, 0): (1 + 9) / 2 = 5.
    """
    mask = (labels != IGNORE_INDEX).to(upcast(hidden[:0]).dtype)
    squared = (upcast(hidden) - upcast(target)).pow(2).mean(dim=-1)  # (B, T)
    per_row = (squared * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    return per_row.mean()


def steering_vector(hidden_size: int, coeff: float, seed: int) -> torch.Tensor:
    """RMU's target ``c * u``: u drawn uniform in [0, 1)^H from ``seed`` and normalised (as WMDP's code)."""
    u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u / u.norm() * coeff).float()


# --------------------------------------------------------------------------- the loss table


class PartOutput(NamedTuple):
    """What the trainer computed for one batch part: logits and labels, and when a term asks for them, the
    reference logits, the chosen layer's hidden states and the reference's hidden states."""

    logits: torch.Tensor
    labels: torch.Tensor
    ref_logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    ref_hidden: torch.Tensor | None = None


@dataclass
class LossParams(LossSettings):
    """What the terms read: the settings, and RMU's steering vector ``c * u``, made by the trainer once the hidden
    size is known."""

    steering: torch.Tensor | None = None


# --------------------------------------------------------------------------- what a term averages over
# Every term is a mean over units (answer tokens, or rows) of its batch. The trainer needs the unit count to
# make that mean a global one over a whole optimizer step (all micro-batches, all processes), so that a step
# gives the same loss however its items are split. Each counter below is exactly the divisor of the term's
# mean (tests/trainer/test_world_size.py holds every term to it).

Units = Callable[[Mapping[str, torch.Tensor], LossParams], torch.Tensor]


def answer_tokens(labels: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """Counted (predicted) tokens of a part, leaving out each row's first ``skip`` of them."""
    target = shift_labels(labels)
    if skip:
        target = skip_first_answer_tokens(target, skip)
    return (target != IGNORE_INDEX).sum()


def answered_rows(labels: torch.Tensor) -> torch.Tensor:
    """Rows with at least one counted token (SimNPO normalises by length, so an empty row counts as nothing)."""
    return (shift_labels(labels) != IGNORE_INDEX).any(dim=-1).sum()


def all_positions(labels: torch.Tensor) -> torch.Tensor:
    """Every position of a part (batchmean terms)."""
    return torch.tensor(labels.numel(), device=labels.device)


def all_rows(labels: torch.Tensor) -> torch.Tensor:
    """Every row of a part (sequence-level terms: NPO, DPO, AP, RMU)."""
    return torch.tensor(labels.size(0), device=labels.device)


def tokens_of(part: str) -> Units:
    """The answer tokens of ``part``."""
    return lambda labels, hp: answer_tokens(labels[part])


def rows_of(part: str) -> Units:
    """The rows of ``part``."""
    return lambda labels, hp: all_rows(labels[part])


@dataclass(frozen=True, kw_only=True)
class LossTerm:
    """One term of an objective: the batch parts it reads, what it needs computed, and how.

    ``needs_ref``: reference outputs (the model with its adapter off, or a frozen copy when every weight
    trains). ``every_position``: given the hyper-parameters, whether the term reads every position's logits
    (not only those predicting counted tokens). ``needs_hidden``: the hidden states of the trainer's chosen layer
    (RMU). ``needs_logits``: False lets the trainer skip the output head for the part. ``dual``: the term's weight
    is PDU's dual variable instead of a fixed coefficient. ``units``: the count the term's mean divides by, from the
    parts' labels alone (known before any forward pass). ``fusable``: the term reads its logits (and
    reference logits) only through per-token NLL or ME, so it accepts a :class:`~ops.head.HeadInput`
    and the trainer may skip building the logits (the fused head).
    """

    parts: tuple[str, ...]
    needs_ref: bool
    compute: Callable[[Mapping[str, PartOutput], LossParams], torch.Tensor]
    units: Units
    needs_hidden: bool = False
    needs_logits: bool = True
    dual: bool = False
    fusable: bool = False
    every_position: Callable[[LossParams], bool] | None = None  # reads the logits of every position (batchmean)


# Each term: ``compute(out, hp)`` with ``out`` the parts' outputs by name (``out["forget"].logits``, ...) and ``hp``
# the run's LossParams; ``units`` counts what its mean divides by.
GA = LossTerm(parts=("forget",), needs_ref=False, fusable=True, units=tokens_of("forget"),
              compute=lambda out, hp: ga_loss(out["forget"].logits, out["forget"].labels))
ME = LossTerm(parts=("forget",), needs_ref=False, fusable=True, units=tokens_of("forget"),
              compute=lambda out, hp: me_loss(out["forget"].logits, out["forget"].labels, hp.me_floor))
IDK = LossTerm(parts=("forget_idk",), needs_ref=False, fusable=True, units=tokens_of("forget_idk"),
               compute=lambda out, hp: nll_loss(out["forget_idk"].logits, out["forget_idk"].labels))
NPO = LossTerm(parts=("forget",), needs_ref=True, fusable=True, units=rows_of("forget"),
               compute=lambda out, hp: npo_loss(out["forget"].logits, out["forget"].labels,
                                                out["forget"].ref_logits, hp.beta))
DPO = LossTerm(parts=("forget", "forget_idk"), needs_ref=True, fusable=True, units=rows_of("forget"),
               compute=lambda out, hp: dpo_loss(out["forget"].logits, out["forget"].labels,
                                                out["forget_idk"].logits, out["forget_idk"].labels,
                                                out["forget"].ref_logits, out["forget_idk"].ref_logits, hp.beta))
SIMNPO = LossTerm(parts=("forget",), needs_ref=False, fusable=True,
                  units=lambda labels, hp: answered_rows(labels["forget"]),
                  compute=lambda out, hp: simnpo_loss(out["forget"].logits, out["forget"].labels, hp.simnpo_beta,
                                                      hp.simnpo_delta))
UNDIAL = LossTerm(parts=("forget",), needs_ref=True, units=tokens_of("forget"),
                  compute=lambda out, hp: undial_loss(out["forget"].logits, out["forget"].labels,
                                                      out["forget"].ref_logits, hp.undial_beta))
WGA = LossTerm(parts=("forget",), needs_ref=False, fusable=True, units=tokens_of("forget"),
               compute=lambda out, hp: wga_loss(out["forget"].logits, out["forget"].labels, hp.wga_beta))
SATIMP = LossTerm(parts=("forget",), needs_ref=False, fusable=True, units=tokens_of("forget"),
                  compute=lambda out, hp: satimp_loss(out["forget"].logits, out["forget"].labels, hp.satimp_beta1,
                                                      hp.satimp_beta2))
CEU = LossTerm(parts=("forget",), needs_ref=False,
               units=lambda labels, hp: answer_tokens(labels["forget"], hp.ceu_skip_tokens),
               compute=lambda out, hp: ceu_loss(out["forget"].logits, out["forget"].labels, hp.ceu_skip_tokens))
PDU_F = LossTerm(parts=("forget",), needs_ref=False, units=tokens_of("forget"),
                 compute=lambda out, hp: pdu_forget_loss(out["forget"].logits, out["forget"].labels))
RMU_F = LossTerm(parts=("forget",), needs_ref=False, needs_hidden=True, needs_logits=False, units=rows_of("forget"),
                 compute=lambda out, hp: rmu_loss(out["forget"].hidden, hp.steering, out["forget"].labels))

GD = LossTerm(parts=("retain",), needs_ref=False, fusable=True, units=tokens_of("retain"),
              compute=lambda out, hp: nll_loss(out["retain"].logits, out["retain"].labels))
KL = LossTerm(parts=("retain",), needs_ref=True,
              units=lambda labels, hp: (all_positions(labels["retain"]) if hp.kl_reduction == "batchmean"
                                        else answer_tokens(labels["retain"])),
              every_position=lambda hp: hp.kl_reduction == "batchmean",
              compute=lambda out, hp: kl_loss(out["retain"].logits, out["retain"].ref_logits, out["retain"].labels,
                                              hp.kl_reduction))
AP = LossTerm(parts=("retain", "retain_idk"), needs_ref=False, fusable=True, units=rows_of("retain"),
              compute=lambda out, hp: ap_loss(out["retain"].logits, out["retain"].labels, out["retain_idk"].logits,
                                              out["retain_idk"].labels, hp.beta))
PDU_R = LossTerm(parts=("retain",), needs_ref=False, dual=True, fusable=True, units=tokens_of("retain"),
                 compute=lambda out, hp: nll_loss(out["retain"].logits, out["retain"].labels))
RMU_R = LossTerm(parts=("retain",), needs_ref=True, needs_hidden=True, needs_logits=False, units=rows_of("retain"),
                 compute=lambda out, hp: rmu_loss(out["retain"].hidden, out["retain"].ref_hidden, out["retain"].labels))

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
    # open-unlearning's methods, each alone and with the GD / KL retain terms
    **{f"{name}{suffix}": (term, retain)
       for name, term in (("SimNPO", SIMNPO), ("UNDIAL", UNDIAL), ("WGA", WGA), ("SatImp", SATIMP), ("CE-U", CEU))
       for suffix, retain in (("", None), ("+GD", GD), ("+KL", KL))},
    "RMU": (RMU_F, RMU_R),  # forget: steer layer l to c*u; retain: keep layer l where the reference has it
    "RMU+GD": (RMU_F, GD),
    "PDU": (PDU_F, PDU_R),  # retain NLL weighted by the dual variable (dual_step)
}

# parts that only exist when a refusal (IDK) file is given
IDK_PARTS = frozenset({"forget_idk", "retain_idk"})


def _any_term(loss_type: str, test: Callable[[LossTerm], bool]) -> bool:
    return any(term is not None and test(term) for term in LOSSES[loss_type])


def needs_idk(loss_type: str) -> bool:
    """Whether ``loss_type`` reads a refusal part (so an IDK file is required)."""
    return _any_term(loss_type, lambda term: bool(IDK_PARTS & set(term.parts)))


def needs_hidden(loss_type: str) -> bool:
    """Whether a term of ``loss_type`` reads a layer's hidden states (RMU)."""
    return _any_term(loss_type, lambda term: term.needs_hidden)


def needs_reference(loss_type: str) -> bool:
    """Whether a term of ``loss_type`` reads reference outputs (NPO, DPO, KL, UNDIAL, RMU)."""
    return _any_term(loss_type, lambda term: term.needs_ref)
