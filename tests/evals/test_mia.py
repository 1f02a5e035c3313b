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
    gradnorm_score,
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


def test_priv_leak_in_muses_orientation():
    """MUSE's AUC is 1 - ours: our 0.75 against a retrained model's 0.5 is MUSE's 0.25 vs 0.5: -50 %; a target
    that still detects every forget item (AUC 1.0 here) scores -100 (MUSE's tables: -99.8); over-unlearning (0.3)
    is positive: +40 %. A retrained AUC of 0.4 (0.6 in MUSE's terms): (0.3 - 0.6) / 0.6 = -50 % for our 0.7."""
    assert priv_leak(0.75, 0.5) == pytest.approx(-50.0)
    assert priv_leak(1.0, 0.5) == pytest.approx(-100.0)
    assert priv_leak(0.3, 0.5) == pytest.approx(40.0)
    assert priv_leak(0.7, 0.4) == pytest.approx(-50.0)
    assert priv_leak(0.5, 0.5) == 0.0


def test_exact_memorisation():
    assert exact_memorisation([5, 6, 0, 8], [5, 6, 7, 8]) == 0.75
    assert exact_memorisation([], []) is None  # open-unlearning's value for an item with no token


def test_extraction_strength():
    """labels (5, 6, 7, 8): argmax (9, 6, 7, 8): from k = 1 on everything is reproduced: 1 - 1/4;
    all reproduced: 1; the last token wrong: no prefix works: 1/n, as open-unlearning (its search ends at
    k = n - 1); only the last right: k = 3: 1/4 too."""
    labels = [5, 6, 7, 8]
    assert extraction_strength([9, 6, 7, 8], labels) == 0.75
    assert extraction_strength(labels, labels) == 1.0
    assert extraction_strength([5, 6, 7, 9], labels) == 0.25
    assert extraction_strength([0, 0, 0, 8], labels) == 0.25
    assert extraction_strength([5, 0, 7, 8], labels) == 0.5  # the suffix must be unbroken
    assert extraction_strength([], []) == 0.0


def test_gradnorm_reductions():
    assert gradnorm_score([5.0, 12.0]) == 8.5 and gradnorm_score([5.0, 12.0], "global") == 13.0
    with pytest.raises(ValueError):
        gradnorm_score([1.0], "max")


# --------------------------------------------------------------------------- open-unlearning's definitions


def ou_tokenwise(logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor):
    """Transcribed from open-unlearning (src/evals/metrics/utils.py, tokenwise_logprobs / tokenwise_vocab_logprobs):
    per row, log p of every label but the last, the vocabulary log-probs at those positions and those labels."""
    log_probs = torch.log_softmax(logits, dim=-1)[:, :-1, :]
    next_tokens = input_ids[:, 1:].unsqueeze(-1)
    target_log_probs = torch.gather(log_probs, dim=2, index=next_tokens).squeeze(-1)
    out = []
    for i in range(len(labels)):
        actual_indices = (labels[i] != -100).nonzero(as_tuple=True)[0][:-1]
        if len(actual_indices) == 0:
            out.append((torch.tensor([]), torch.zeros(0, logits.size(-1)), torch.tensor([], dtype=torch.long)))
            continue
        start_idx, end_idx = actual_indices[0].item(), actual_indices[-1].item()
        out.append((target_log_probs[i, start_idx - 1 : end_idx], log_probs[i, start_idx - 1 : end_idx],
                    labels[i][actual_indices]))
    return out


def ou_scores(logits, input_ids, labels, texts, k=0.4):
    """open-unlearning's per-item Min-K%, Min-K%++, LOSS, ZLib, EM and ES (src/evals/metrics/mia/*.py,
    memorization.py, utils.py::evaluate_probability), transcribed."""
    import numpy as np

    shifted = labels[:, 1:]
    logp_all = torch.log_softmax(logits[:, :-1], dim=-1)
    rows = []
    for i, (lp, vocab_lp, lab) in enumerate(ou_tokenwise(logits, input_ids, labels)):
        counted = shifted[i] != -100
        nll = -logp_all[i][counted].gather(-1, shifted[i][counted].unsqueeze(-1)).squeeze(-1)
        avg_loss = float(nll.sum() / counted.sum())
        lpn = lp.float().numpy()
        min_k = 0 if lpn.size == 0 else -np.mean(np.sort(lpn)[: max(1, int(len(lpn) * k))])
        mu = (torch.exp(vocab_lp) * vocab_lp).sum(-1)
        sigma = torch.clamp((torch.exp(vocab_lp) * torch.square(vocab_lp)).sum(-1) - torch.square(mu), min=1e-6)
        scores = ((lp - mu) / torch.sqrt(sigma)).numpy()
        min_k_pp = 0 if scores.size == 0 else -np.mean(sorted(scores)[: max(1, int(len(scores) * k))])
        preds = vocab_lp.argmax(-1)
        n = len(lab)
        em = None if n == 0 else float((preds == lab).sum() / n)
        for j in range(n):
            if torch.equal(preds[j:], lab[j:]):
                break
        es = 0 if n == 0 else 1 - j / n
        rows.append({"loss": avg_loss, "zlib": avg_loss / len(zlib.compress(texts[i].encode("utf-8"))),
                     "min_k": float(min_k), "min_k_pp": float(min_k_pp), "em": em, "es": es})
    return rows


def test_every_score_equals_open_unlearnings_definition():
    """On fixed small inputs (peaked logits, as a memorised model's; answers of 1 to 6 labels, the last one an
    EOS the model gets wrong in some rows), every per-item score of evals.mia (through evals.unlearning's
    item_scores, from the per-token statistics token_stats builds) equals open-unlearning's transcribed formula."""
    from evals.mia import MiaOptions, distribution_moments
    from evals.unlearning import TokenStats, item_scores

    gen = torch.Generator().manual_seed(7)
    vocab, length = 9, 10
    input_ids = torch.randint(0, vocab, (5, length), generator=gen)
    labels = torch.full_like(input_ids, -100)
    for row, (start, end) in enumerate([(3, 9), (2, 10), (5, 7), (8, 9), (4, 10)]):
        labels[row, start:end] = input_ids[row, start:end]
    logits = torch.randn(5, length, vocab, generator=gen, dtype=torch.float64)
    logits[:, :-1].scatter_add_(2, input_ids[:, 1:].unsqueeze(-1), torch.full((5, length - 1, 1), 6.0,
                                                                             dtype=torch.float64))  # memorised
    logits[1, 8] = 0.0  # row 1 misses its last (EOS) label
    texts = [f"answer {i}" for i in range(5)]
    expected = ou_scores(logits, input_ids, labels, texts)
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    logp = torch.log_softmax(logits, -1)
    mu, sigma = distribution_moments(logits)
    checked = 0
    for row in range(5):
        keep = target[row] != -100
        ids = target[row][keep]
        stats = TokenStats(logprobs=logp[row][keep].gather(-1, ids[:, None]).squeeze(-1).tolist(),
                           mu=mu[row][keep].tolist(), sigma=sigma[row][keep].tolist(),
                           argmax=logits[row][keep].argmax(-1).tolist(), labels=ids.tolist())
        ours = item_scores(stats, texts[row], None, None, MiaOptions())
        for key, value in expected[row].items():
            if value is None:  # EM of an item with no token left
                assert ours[key] is None, (row, key)
            else:
                assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (row, key)  # they cast to float32
            checked += 1
    assert checked == 30
