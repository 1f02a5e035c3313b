"""Did it really forget? Membership-inference scores, their AUC, PrivLeak, and memorisation metrics.

Pure functions of per-token log-probabilities (and texts); :mod:`evals.unlearning` runs the model.

**Orientation.** Every MIA score here is *loss-like*: higher means "looks less like training data". The
AUC of forget (members) against holdout (never trained on) items is
``P(score_holdout > score_forget) + 1/2 P(tie)`` (Mann-Whitney, exact): 1.0 when every forget item looks
more trained-on than every holdout item, 0.5 when the two cannot be told apart (the goal of unlearning,
and what a model that never saw the forget items scores), below 0.5 when forget items look *less*
trained-on than unseen text (over-unlearning, itself a leak). Same convention as open-unlearning.

Scores per item (``logprobs``: log p of each answer token under the model, teacher-forced):

- LOSS (Yeom et al. 2018): mean answer NLL;
- ZLib (Carlini et al. 2021): mean answer NLL / bytes of the zlib-compressed answer text;
- Min-K% (Shi et al. 2024): mean of the lowest k% token log-probs, negated (k = 0.4 by default here,
  at least one token);
- Min-K%++ (Zhang et al. 2024): each token's log p standardised by the mean and standard deviation of
  log p under the model's own next-token distribution at that position, lowest k% averaged, negated;
- Reference (Carlini et al. 2022): NLL minus the reference model's NLL (here the base model with the
  adapter off, or any model given);
- GradNorm (Wang et al. 2024): the mean over weight tensors of each one's gradient L2 norm, the gradient of the
  mean answer NLL (computed by :mod:`evals.unlearning`; higher = less trained-on).

**Which answer tokens**, as open-unlearning: LOSS, ZLib and Reference read every answer label, the EOS that ends
the answer included; Min-K%, Min-K%++, GradNorm, EM and ES leave each answer's last label (the EOS) out
(:func:`tokenwise`). ZLib compresses the answer's tokens decoded without special tokens.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIN_K = 0.4
GRADNORM_REDUCTIONS = ("tensor_mean", "global")


@dataclass(frozen=True)
class MiaOptions:
    """How the scores are taken: Min-K%'s k, whether the token-wise scores (Min-K%, Min-K%++, GradNorm, EM, ES) also
    count the answer's last label (open-unlearning leaves it out), and GradNorm's reduction over weight tensors."""

    k: float = MIN_K
    keep_last: bool = False
    gradnorm_reduction: str = "tensor_mean"


def tokenwise(values: Sequence, keep_last: bool = False) -> list:
    """The per-token values the token-wise scores read: all but the answer's last label (the EOS), as
    open-unlearning's ``tokenwise_logprobs``; ``keep_last`` keeps it."""
    return list(values) if keep_last else list(values)[:-1]


def loss_score(logprobs: Sequence[float]) -> float:
    """LOSS: mean answer NLL (``-mean log p``). Hand value: log p = (ln 1/2, ln 1/4): (ln 2 + ln 4) / 2."""
    if not len(logprobs):
        raise ValueError("an item with no answer token has no score")
    return -sum(logprobs) / len(logprobs)


def zlib_bytes(text: str) -> int:
    """Length in bytes of the zlib-compressed UTF-8 text (default level)."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_score(logprobs: Sequence[float], text: str) -> float:
    """ZLib: mean answer NLL divided by the zlib-compressed length of the answer text."""
    return loss_score(logprobs) / zlib_bytes(text)


def _lowest_mean(values: Sequence[float], k: float) -> float:
    if not len(values):
        raise ValueError("an item with no answer token has no score")
    n = max(1, int(len(values) * k))
    return sum(sorted(values)[:n]) / n


def min_k_score(logprobs: Sequence[float], k: float = MIN_K) -> float:
    """Min-K%: ``-mean`` of the ``max(1, int(k * n))`` lowest token log-probs (0 for an item with no token, as
    open-unlearning).

    Hand value: log p = (-1, -2, -3, -4, -5), k = 0.4: the two lowest (-5, -4) average -4.5: score 4.5.
    """
    return -_lowest_mean(logprobs, k) if len(logprobs) else 0.0


def min_k_plus_plus_score(logprobs: Sequence[float], mu: Sequence[float], sigma: Sequence[float],
                          k: float = MIN_K) -> float:
    """Min-K%++: ``z_t = (log p(y_t) - mu_t) / sigma_t`` with ``mu_t = E_p[log p]`` and ``sigma_t`` the
    standard deviation of log p under the model's next-token distribution; ``-mean`` of the lowest k%.

    Hand value: a uniform distribution over 2 tokens has mu = ln 1/2 and sigma = 0 (clamped to 1e-3 so
    that a flat position scores 0 rather than dividing by zero): log p = ln 1/2 gives z = 0.
    """
    z = [(lp - m) / max(s, 1e-3) for lp, m, s in zip(logprobs, mu, sigma, strict=True)]
    return -_lowest_mean(z, k) if z else 0.0


def distribution_moments(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``log p`` under ``p = softmax(logits)``, per position ``(..., )``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * logp.square()).sum(-1) - mu.square()
    return mu, var.clamp(min=0).sqrt()


def reference_score(nll: float, reference_nll: float) -> float:
    """Reference: the model's mean answer NLL minus the reference model's (a calibrated LOSS)."""
    return nll - reference_nll


def auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """Exact Mann-Whitney AUC: ``P(holdout > forget) + 1/2 P(holdout == forget)`` over all pairs.

    Hand value: forget (1, 2), holdout (2, 3): pairs (1,2) >, (1,3) >, (2,2) tie, (2,3) >: (3 + 0.5) / 4.
    """
    if not forget_scores or not holdout_scores:
        raise ValueError("AUC needs at least one forget and one holdout score")
    # rank-sum form: O((n + m) log(n + m)), ties given their mid-rank
    pooled = sorted([(s, 0) for s in forget_scores] + [(s, 1) for s in holdout_scores])
    ranks = [0.0] * len(pooled)
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for t in range(i, j + 1):
            ranks[t] = (i + j) / 2 + 1
        i = j + 1
    n_h, n_f = len(holdout_scores), len(forget_scores)
    rank_sum = sum(r for r, (_, side) in zip(ranks, pooled, strict=True) if side == 1)
    return (rank_sum - n_h * (n_h + 1) / 2) / (n_h * n_f)


def priv_leak(auc_unlearned: float, auc_retrain: float) -> float:
    """PrivLeak (Shi et al. 2024, MUSE), in percent, in MUSE's orientation.

    MUSE's AUC is ``1 - ours`` (its scores separate the sets the other way round: a model that still knows the
    forget set scores near 0 there, near 1 here) and PrivLeak is ``(AUC_unlearned - AUC_retrain) / AUC_retrain x
    100`` on its AUC, i.e. ``((1 - a) - (1 - r)) / (1 - r) x 100`` on ours (open-unlearning computes the same). 0 is
    ideal (as private as a model never trained on the forget set); strongly negative (down to -100): the forget
    items are still detectable, under-unlearning (a target that memorised them scores about -99.8 in MUSE's
    tables); positive: over-unlearning. Hand value: our AUC 0.75 against a retrained model's 0.5:
    ``(0.25 - 0.5) / 0.5 = -50 %``.
    """
    return ((1 - auc_unlearned) - (1 - auc_retrain)) / ((1 - auc_retrain) + 1e-10) * 100  # open-unlearning's 1e-10


def exact_memorisation(argmax_ids: Sequence[int], label_ids: Sequence[int]) -> float | None:
    """Share of answer tokens the teacher-forced argmax reproduces (Tirumala et al. 2022's EM); ``None`` for an
    item with no token (open-unlearning's value there)."""
    if not len(label_ids):
        return None
    return sum(a == b for a, b in zip(argmax_ids, label_ids, strict=True)) / len(label_ids)


def extraction_strength(argmax_ids: Sequence[int], label_ids: Sequence[int]) -> float:
    """Extraction strength (Carlini et al. 2021), as open-unlearning computes it: ``1 - k/n`` for the shortest
    answer prefix ``k < n`` after which the model reproduces the rest of the answer exactly; when none does, the
    search ends at ``k = n - 1`` and the value is ``1/n``.

    Greedy decoding after prefix ``y[:k]`` reproduces ``y[k:]`` exactly iff the teacher-forced argmax equals the
    label at every position from ``k`` on, so one forward pass decides it. Hand value: labels (5, 6, 7, 8), argmax
    (9, 6, 7, 8): k = 1, ES = 3/4; argmax (5, 6, 7, 9): no k works, ES = 1/4. 0 for an item with no token.
    """
    n = len(label_ids)
    if not n:
        return 0.0
    k = n
    while k > 0 and argmax_ids[k - 1] == label_ids[k - 1]:
        k -= 1
    return 1 - min(k, n - 1) / n


def gradnorm_score(tensor_norms: Sequence[float], reduction: str = "tensor_mean") -> float:
    """GradNorm (Wang et al. 2024) from each weight tensor's gradient L2 norm: their mean (open-unlearning's
    definition, ``tensor_mean``) or the L2 norm of the whole gradient (``global``). Hand value: norms (5, 12):
    8.5, or 13."""
    if not len(tensor_norms):
        raise ValueError("no gradient")
    if reduction == "tensor_mean":
        return math.fsum(tensor_norms) / len(tensor_norms)
    if reduction == "global":
        return math.sqrt(math.fsum(x * x for x in tensor_norms))
    raise ValueError(f"unknown GradNorm reduction {reduction!r}")


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if len(values) else float("nan")
