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
- GradNorm (Wang et al. 2024): L2 norm of the gradient of the mean answer NLL w.r.t. the trainable
  weights (computed by :mod:`evals.unlearning`; higher = less trained-on).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

MIN_K = 0.4


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
    """Min-K%: ``-mean`` of the ``max(1, int(k * n))`` lowest token log-probs.

    Hand value: log p = (-1, -2, -3, -4, -5), k = 0.4: the two lowest (-5, -4) average -4.5: score 4.5.
    """
    return -_lowest_mean(logprobs, k)


def min_k_plus_plus_score(logprobs: Sequence[float], mu: Sequence[float], sigma: Sequence[float],
                          k: float = MIN_K) -> float:
    """Min-K%++: ``z_t = (log p(y_t) - mu_t) / sigma_t`` with ``mu_t = E_p[log p]`` and ``sigma_t`` the
    standard deviation of log p under the model's next-token distribution; ``-mean`` of the lowest k%.

    Hand value: a uniform distribution over 2 tokens has mu = ln 1/2 and sigma = 0 (clamped to 1e-3 so
    that a flat position scores 0 rather than dividing by zero): log p = ln 1/2 gives z = 0.
    """
    z = [(lp - m) / max(s, 1e-3) for lp, m, s in zip(logprobs, mu, sigma, strict=True)]
    return -_lowest_mean(z, k)


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
    """PrivLeak (Shi et al. 2024, MUSE): ``(AUC_unlearned - AUC_retrain) / AUC_retrain``, in percent.

    0 is ideal (the unlearned model is as private as one never trained on the forget set); large positive:
    forget items still detectable (under-unlearning); large negative: over-unlearning.
    Hand value: AUC 0.75 against a retrained model's 0.5: +50 %.
    """
    return (auc_unlearned - auc_retrain) / auc_retrain * 100


def exact_memorisation(argmax_ids: Sequence[int], label_ids: Sequence[int]) -> float:
    """Share of answer tokens the teacher-forced argmax reproduces (Tirumala et al. 2022's EM)."""
    if not len(label_ids):
        raise ValueError("an item with no answer token has no exact memorisation")
    return sum(a == b for a, b in zip(argmax_ids, label_ids, strict=True)) / len(label_ids)


def extraction_strength(argmax_ids: Sequence[int], label_ids: Sequence[int]) -> float:
    """Extraction strength (Carlini et al. 2021; as open-unlearning): ``1 - k/n`` for the shortest answer
    prefix ``k`` after which the model reproduces the rest of the answer exactly; 0 when no prefix does.

    Greedy decoding after prefix ``y[:k]`` reproduces ``y[k:]`` exactly iff the teacher-forced argmax
    equals the label at every position from ``k`` on, so one forward pass decides it. ``k = n`` (nothing
    left to reproduce) does not count: the reference implementation returns ``1/n`` when nothing matches
    (its loop ends at ``k = n - 1``); ours returns 0. Hand value: labels (5, 6, 7, 8), argmax (9, 6, 7, 8):
    k = 1, ES = 3/4; argmax (5, 6, 7, 9): the last token is never reproduced, ES = 0.
    """
    n = len(label_ids)
    if not n:
        raise ValueError("an item with no answer token has no extraction strength")
    k = n
    while k > 0 and argmax_ids[k - 1] == label_ids[k - 1]:
        k -= 1
    return 0.0 if k == n else 1 - k / n


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if len(values) else float("nan")
