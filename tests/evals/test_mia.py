"""MIA scores, AUC, PrivLeak, exact memorisation and extraction strength against hand values."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from evals.mia import (
    auc,
    distribution_moments,
    exact_memorisation,
    extraction_strength,
    loss_score,
    min_k_plus_plus_score,
    min_k_score,
    priv_leak,
    reference_score,
    zlib_bytes,
    zlib_score,
)


def test_loss_and_reference_scores():
    """log p = (ln 1/2, ln 1/4): mean NLL (ln 2 + ln 4) / 2 = 1.5 ln 2; minus a reference's 0.5 ln 2: ln 2."""
    lp = [math.log(0.5), math.log(0.25)]
    assert loss_score(lp) == pytest.approx(1.5 * math.log(2))
    assert reference_score(loss_score(lp), 0.5 * math.log(2)) == pytest.approx(math.log(2))
    with pytest.raises(ValueError):
        loss_score([])


def test_zlib_on_a_known_string():
    """zlib of b"aaaaaaaaaa" at the default level is 78 9c 4b 4c 84 01 00 14 e1 03 cb: 11 bytes (header 2,
    deflate block 5, Adler-32 4). A text that repeats compresses better per character than one that does not."""
    assert zlib.compress(b"aaaaaaaaaa") == bytes.fromhex("789c4b4c840100" + "14e103cb")
    assert zlib_bytes("aaaaaaaaaa") == 11
    assert zlib_score([math.log(0.5)] * 2, "aaaaaaaaaa") == pytest.approx(math.log(2) / 11)
    assert zlib_bytes("ab" * 50) < zlib_bytes("the quick brown fox jumps over the lazy dog, twice or more")


def test_min_k_hand_values():
    """(-1, -2, -3, -4, -5), k = 0.4: two lowest average -4.5 -> 4.5; k = 0.1: max(1, 0) = 1 token -> 5;
    k = 1: all -> 3."""
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert min_k_score(lp) == pytest.approx(4.5)
    assert min_k_score(lp, 0.1) == pytest.approx(5.0)
    assert min_k_score(lp, 1.0) == pytest.approx(3.0)
    """Rounded down: 7 tokens x 0.4 = 2.8 -> the 2 lowest (-7, -6) -> 6.5, not 3 of them."""
    assert min_k_score([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]) == pytest.approx(6.5)


def test_min_k_plus_plus_and_moments():
    """Logits (0, ln 3): p = (1/4, 3/4); mu = 1/4 ln 1/4 + 3/4 ln 3/4; sigma^2 = E[(log p)^2] - mu^2 =
    3/16 (ln 3)^2 (a two-point distribution: p q (ln(p/q))^2). The likely token (3/4) scores above mu."""
    mu, sigma = distribution_moments(torch.tensor([[0.0, math.log(3)]]))
    expected_mu = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    assert mu.item() == pytest.approx(expected_mu, rel=1e-6)
    assert sigma.item() == pytest.approx(math.sqrt(3 / 16) * math.log(3), rel=1e-5)
    z_likely = (math.log(0.75) - expected_mu) / sigma.item()
    z_unlikely = (math.log(0.25) - expected_mu) / sigma.item()
    assert z_likely == pytest.approx(1 / math.sqrt(3)) and z_unlikely == pytest.approx(-math.sqrt(3))
    """Items of 2 tokens, k = 0.4 -> 1 token (the lowest z)."""
    score = min_k_plus_plus_score([math.log(0.75), math.log(0.25)], [expected_mu] * 2, [sigma.item()] * 2)
    assert score == pytest.approx(math.sqrt(3), rel=1e-5)
    """A flat distribution (sigma 0) with its own token: z = 0, not a division by zero."""
    assert min_k_plus_plus_score([math.log(0.5)], [math.log(0.5)], [0.0]) == 0.0
    """A sharp but not flat position (sigma 0.01) is divided by its own sigma: z = -0.02 / 0.01 = -2."""
    assert min_k_plus_plus_score([-1.02], [-1.0], [0.01]) == pytest.approx(2.0)


def test_auc_exact_with_ties():
    """forget (1, 2), holdout (2, 3): (1,2) >, (1,3) >, (2,2) tie, (2,3) >: (3 + 0.5) / 4 = 0.875."""
    assert auc([1, 2], [2, 3]) == pytest.approx(0.875)
    assert auc([1, 1], [5, 6, 7]) == 1.0
    assert auc([5, 6, 7], [1, 1]) == 0.0
    assert auc([2, 2, 2], [2, 2]) == 0.5


def test_auc_equals_the_pairwise_definition():
    torch.manual_seed(0)
    f = torch.randint(0, 6, (17,)).tolist()
    h = torch.randint(0, 6, (11,)).tolist()
    pairwise = sum((b > a) + 0.5 * (b == a) for a in f for b in h) / (len(f) * len(h))
    assert auc(f, h) == pytest.approx(pairwise, abs=1e-12)
    with pytest.raises(ValueError):
        auc([], [1.0])


def test_priv_leak():
    """MUSE: (0.75 - 0.5) / 0.5 = +50 %; an over-unlearned 0.3: -40 %."""
    assert priv_leak(0.75, 0.5) == pytest.approx(50.0)
    assert priv_leak(0.3, 0.5) == pytest.approx(-40.0)


def test_exact_memorisation():
    assert exact_memorisation([5, 6, 0, 8], [5, 6, 7, 8]) == 0.75
    with pytest.raises(ValueError):
        exact_memorisation([], [])


def test_extraction_strength():
    """labels (5, 6, 7, 8): argmax (9, 6, 7, 8): from k = 1 on everything is reproduced: 1 - 1/4;
    all reproduced: 1; the last token wrong: no prefix works: 0 (not 1/n as the reference implementation);
    only the last right: k = 3: 1/4."""
    labels = [5, 6, 7, 8]
    assert extraction_strength([9, 6, 7, 8], labels) == 0.75
    assert extraction_strength(labels, labels) == 1.0
    assert extraction_strength([5, 6, 7, 9], labels) == 0.0
    assert extraction_strength([0, 0, 0, 8], labels) == 0.25
    assert extraction_strength([5, 0, 7, 8], labels) == 0.5  # the suffix must be unbroken
