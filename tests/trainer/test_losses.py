"""Each loss against a value worked out by hand and against a naive float64 reference of the original."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ops.token_values import sequence_nll
from trainer.losses import (
    LOSSES,
    LossParams,
    PartOutput,
    ap_loss,
    dpo_loss,
    ga_loss,
    kl_loss,
    me_loss,
    needs_idk,
    nll_loss,
    npo_loss,
)

LN2, LN3 = math.log(2), math.log(3)


def two_class_logits() -> torch.Tensor:
    """Logits (1, 3, 2): position 0 gives p = (1/4, 3/4), positions 1 and 2 are uniform."""
    return torch.tensor([[[0.0, LN3], [0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)


def test_nll_ga_sequence_nll_hand_values():
    """Labels [-100, 1, 0]: after the shift, label 1 is read at position 0 (p = 3/4, NLL = ln 4/3) and
    label 0 at position 1 (uniform, NLL = ln 2). Mean = (ln 4/3 + ln 2) / 2 = ln(8/3) / 2; the sequence
    sum is ln(8/3); GA is the negated mean."""
    logits, labels = two_class_logits(), torch.tensor([[-100, 1, 0]])
    assert nll_loss(logits, labels).item() == pytest.approx(math.log(8 / 3) / 2, abs=1e-12)
    assert ga_loss(logits, labels).item() == pytest.approx(-math.log(8 / 3) / 2, abs=1e-12)
    assert sequence_nll(logits, labels).tolist() == pytest.approx([math.log(8 / 3)], abs=1e-12)


def test_nll_ignores_masked_tokens():
    """Masking the last label leaves only ln 4/3, whatever the logits at the masked position."""
    logits, labels = two_class_logits(), torch.tensor([[-100, 1, -100]])
    assert nll_loss(logits, labels).item() == pytest.approx(math.log(4 / 3), abs=1e-12)
    logits[0, 1] = torch.tensor([5.0, -7.0])  # position 1 predicts the masked label
    assert nll_loss(logits, labels).item() == pytest.approx(math.log(4 / 3), abs=1e-12)


def test_me_loss_hand_value():
    """At position 0, p = (1/4, 3/4): KL(u || p) = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3).
    Position 1 is uniform: KL = 0. Over the two counted positions the mean is ln(4/3) / 4."""
    logits, labels = two_class_logits(), torch.tensor([[0, 1, 0]])
    assert me_loss(logits, labels, floor=0).item() == pytest.approx(math.log(4 / 3) / 4, abs=1e-12)
    # only position 0 counted: 1/2 ln(4/3)
    only = torch.tensor([[0, 1, -100]])
    assert me_loss(logits, only, floor=0).item() == pytest.approx(math.log(4 / 3) / 2, abs=1e-12)
    # the competition's floor of 1e-12 moves it by about mean(1e-12 / p): far below any tolerance here
    assert me_loss(logits, only).item() == pytest.approx(math.log(4 / 3) / 2, abs=1e-10)


def peaked_logits(seed: int = 0, vocab: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """A memorised model's logits: each counted position puts ~1 - 1e-6 on its label and spreads the rest over a
    few runners-up, most of the vocabulary sitting 30-60 nats below (p far under 1e-12, where the floor binds)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (2, 7), generator=gen)
    labels[0, :2] = -100
    logits = -30.0 - 30.0 * torch.rand(2, 7, vocab, generator=gen, dtype=torch.float64)
    logits[..., :20] += 25.0  # runners-up around 1e-6 .. 1e-10
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=0).clamp(min=0)
    logits.scatter_(2, target.unsqueeze(-1), 0.0)
    return logits, labels


@pytest.mark.parametrize("fused", [False, True])
def test_me_is_the_competitions_formula_on_peaked_logits_in_value_and_gradient(fused):
    """On logits like a memorised model's (most of the vocabulary far below 1e-12), ME with the default floor
    equals the competition's kl_div((softmax(z) + 1e-12).log(), uniform) in value and gradient (through the
    chunked logits path and through the fused head), while the exact closed form (floor 0) is far from it:
    there the floor caps -log p at 27.6 and takes the gradient of the entries below it away."""
    from ops.head import HeadInput

    logits, labels = peaked_logits()
    below = (torch.softmax(logits, -1) < 1e-12).double().mean().item()
    assert below > 0.9  # as a memorised model's (44-66 % on SmolLM2; more on a 152k vocabulary)

    def ours(z, floor=None):
        kwargs = {} if floor is None else {"floor": floor}
        if not fused:
            return me_loss(z, labels, **kwargs)
        eye = torch.eye(z.size(-1), dtype=z.dtype)  # head weight = identity: the hidden states are the logits
        return me_loss(HeadInput(z, eye), labels, **kwargs)

    z1, z2, z3 = (logits.clone().requires_grad_(True) for _ in range(3))
    value, original, closed = ours(z1), naive_me(z2, labels), ours(z3, floor=0.0)
    (value * 3).backward()
    (original * 3).backward()
    closed.backward()
    assert value.item() == pytest.approx(original.item(), rel=1e-9)
    assert torch.allclose(z1.grad, z2.grad, rtol=1e-7, atol=1e-12)
    assert abs(closed.item() - original.item()) > 0.1 * original.item()  # the floor matters here
    assert (z3.grad - z2.grad / 3).norm() > 0.01 * z3.grad.norm()
    closed_form = (torch.logsumexp(logits, -1) - logits.mean(-1) - math.log(logits.size(-1)))
    counted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100
    assert closed.item() == pytest.approx(closed_form[counted].mean().item(), rel=1e-12)


def test_me_floor_gradient_by_hand():
    """V = 3, p = (1 - 2d, d, d) with d = 1e-20 far below the floor e: each tiny entry's gradient is
    (p_j R - r_j) / V with r_j = p_j / (p_j + e) ~ 1e-8 and R ~ 1: almost nothing, where the closed form gives
    p_j - 1/V = -1/3. The value: -ln 3 - (ln(1 - 2d + e) + 2 ln(d + e)) / 3."""
    d, e = 1e-20, 1e-12
    z = torch.tensor([[[0.0, math.log(d), math.log(d)], [0.0, 0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 1]])
    loss = me_loss(z, labels, floor=e)
    p = torch.softmax(z.detach()[0, 0], -1)
    expected = -math.log(3) - (math.log(p[0].item() + e) + 2 * math.log(p[1].item() + e)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    r = p / (p + e)
    assert torch.allclose(z.grad[0, 0], (p * r.sum() - r) / 3, rtol=1e-6, atol=1e-15)  # cancellation near 1
    assert z.grad[0, 0, 1].abs().item() < 1e-8


def test_ap_loss_hand_value():
    """Uniform logits over 2 classes: each counted token has NLL ln 2. Retain counts 1 token (NLL ln 2),
    IDK counts 2 (2 ln 2); margin = ln 2; with beta = 1: -log sigmoid(ln 2) = -log(2/3) = ln(3/2)."""
    zeros = torch.zeros(1, 3, 2, dtype=torch.float64)
    value = ap_loss(zeros, torch.tensor([[-100, -100, 1]]), zeros, torch.tensor([[-100, 0, 1]]), beta=1.0)
    assert value.item() == pytest.approx(math.log(1.5), abs=1e-12)


def test_npo_against_a_moved_reference_hand_value():
    """Labels [-100, 1, 0]. The model is uniform: sequence NLL 2 ln 2. The reference has moved to
    p = (1/4, 3/4) at position 0: sequence NLL ln(4/3) + ln 2 = ln(8/3). Margin = 2 ln 2 - ln(8/3) = ln(3/2);
    with beta = 1: -2 log sigmoid(ln 3/2) = -2 log(3/5) = 2 ln(5/3). Swapping model and reference gives
    margin ln(2/3) and -2 log(2/5) = 2 ln(5/2) instead."""
    labels = torch.tensor([[-100, 1, 0]])
    uniform, moved = torch.zeros(1, 3, 2, dtype=torch.float64), two_class_logits()
    assert npo_loss(uniform, labels, moved, beta=1.0).item() == pytest.approx(2 * math.log(5 / 3), abs=1e-12)
    assert npo_loss(moved, labels, uniform, beta=1.0).item() == pytest.approx(2 * math.log(5 / 2), abs=1e-12)
    """beta = 1/2: -(2/beta) log sigmoid(ln(3/2) / 2) = 4 log(1 + sqrt(2/3))."""
    assert npo_loss(uniform, labels, moved, beta=0.5).item() == pytest.approx(4 * math.log(1 + math.sqrt(2 / 3)),
                                                                              abs=1e-12)


def two_token_answer(p_first: float, p_second: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (1, 3, 2) and labels [-100, 0, 0]: the answer's two tokens (class 0) have probabilities ``p_first``
    and ``p_second`` (logits ``(log p, log(1 - p))``, exact softmax), the last position predicts nothing."""
    rows = [[math.log(p), math.log(1 - p)] for p in (p_first, p_second, 0.5)]
    return torch.tensor([rows], dtype=torch.float64), torch.tensor([[-100, 0, 0]])


def test_npo_and_dpo_hand_values_on_a_memorised_reference():
    """The reference has memorised the answer (p = 0.9 and 0.95 per token), the model has half forgotten it
    (0.5, 0.6): NPO = -(2/beta) log sigmoid(beta (nll - nll_ref)), nll = -ln 0.5 - ln 0.6, nll_ref = -ln 0.9 -
    ln 0.95. DPO adds a refusal whose probability rose from 0.2 to 0.7 (one token): DPO = -(2/beta) log
    sigmoid(beta ((ln 0.7 - ln 0.2) - (ln 0.5 + ln 0.6 - ln 0.9 - ln 0.95)))."""
    beta = 0.1
    model, labels = two_token_answer(0.5, 0.6)
    reference, _ = two_token_answer(0.9, 0.95)
    margin = (-math.log(0.5) - math.log(0.6)) - (-math.log(0.9) - math.log(0.95))
    npo = -(2 / beta) * math.log(1 / (1 + math.exp(-beta * margin)))
    assert npo_loss(model, labels, reference, beta=beta).item() == pytest.approx(npo, abs=1e-12)
    idk = torch.tensor([[[math.log(0.7), math.log(0.3)], [0.0, 0.0]]], dtype=torch.float64)
    ref_idk = torch.tensor([[[math.log(0.2), math.log(0.8)], [0.0, 0.0]]], dtype=torch.float64)
    idk_labels = torch.tensor([[-100, 0]])
    chosen, rejected = math.log(0.7) - math.log(0.2), -margin
    dpo = -(2 / beta) * math.log(1 / (1 + math.exp(-beta * (chosen - rejected))))
    value = dpo_loss(model, labels, idk, idk_labels, reference, ref_idk, beta=beta).item()
    assert value == pytest.approx(dpo, abs=1e-12)


def naive_dpo(forget, forget_labels, idk, idk_labels, ref_forget, ref_idk, beta):
    """DPO as written in the papers, in float64: the refusal is preferred (chosen), the forget answer
    dispreferred (rejected); log-probabilities are summed over each answer's counted tokens."""
    def logp(logits, labels):
        return -naive_batch_nll(logits, labels)

    chosen = logp(idk, idk_labels) - logp(ref_idk, idk_labels)
    rejected = logp(forget, forget_labels) - logp(ref_forget, forget_labels)
    return -(2 / beta) * F.logsigmoid(beta * (chosen - rejected)).mean()


def test_dpo_against_a_naive_dpo_with_a_moved_reference(random_batch):
    """Model and reference differ on both answers; the loss equals the naive DPO, and moving the model
    towards the refusal (chosen) lowers it below the no-change value 20 ln 2, towards the forget answer raises it."""
    logits, labels = random_batch
    idk, idk_labels = logits.flip(0) * 0.7, labels.flip(0)
    torch.manual_seed(2)
    ref_forget, ref_idk = logits + torch.randn_like(logits), idk + torch.randn_like(idk)
    for beta in (0.1, 1.0):
        expected = naive_dpo(logits, labels, idk, idk_labels, ref_forget, ref_idk, beta)
        got = dpo_loss(logits, labels, idk, idk_labels, ref_forget, ref_idk, beta)
        assert got.item() == pytest.approx(expected.item(), rel=1e-10)
    boost = torch.zeros_like(idk)
    boost.scatter_(-1, F.pad(idk_labels[:, 1:], (0, 1), value=0).clamp(min=0).unsqueeze(-1), 5.0)
    prefers_idk = dpo_loss(ref_forget, labels, ref_idk + boost, idk_labels, ref_forget, ref_idk, 0.1)
    prefers_forget = dpo_loss(ref_forget, labels, ref_idk - boost, idk_labels, ref_forget, ref_idk, 0.1)
    assert prefers_idk.item() < 20 * LN2 - 1 and prefers_forget.item() > 20 * LN2 + 1


def test_kl_loss_hand_value():
    """Current uniform, reference p = (1/4, 3/4) at position 0 (the only counted one):
    KL(ref || cur) = 1/4 ln(1/4 / 1/2) + 3/4 ln(3/4 / 1/2) = -1/4 ln 2 + 3/4 ln 3/2."""
    ref = two_class_logits()
    cur = torch.zeros_like(ref)
    labels = torch.tensor([[0, 1, -100]])
    expected = -0.25 * LN2 + 0.75 * math.log(1.5)
    assert kl_loss(cur, ref, labels).item() == pytest.approx(expected, abs=1e-12)
    assert kl_loss(ref, ref, labels).item() == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- naive references (the original)


def naive_me(logits, labels):
    """The original ME: softmax, a materialised uniform, element-wise KL, masked mean."""
    v = logits.shape[-1]
    labels, logits = labels[:, 1:], logits[:, :-1, :]
    soft = F.softmax(logits, dim=-1).reshape(-1, v)
    uniform = torch.full_like(soft, 1.0 / v)
    mask = (labels != -100).reshape(-1)
    kl = F.kl_div((soft + 1e-12).log(), uniform, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum()


def naive_batch_nll(logits, labels):
    return F.cross_entropy(logits[:, :-1].transpose(-1, -2), labels[:, 1:], ignore_index=-100, reduction="none").sum(-1)


@pytest.fixture()
def random_batch():
    torch.manual_seed(1)
    logits = torch.randn(3, 9, 50, dtype=torch.float64) * 3
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = -100  # a masked question
    labels[2, 6:] = -100  # padding
    return logits, labels


def test_against_original_definitions(random_batch):
    logits, labels = random_batch
    idk_logits, idk_labels = logits.flip(0), labels.flip(0)
    beta = 0.1
    assert me_loss(logits, labels).item() == pytest.approx(naive_me(logits, labels).item(), abs=1e-12)
    hf = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert nll_loss(logits, labels).item() == pytest.approx(hf.item(), abs=1e-10)
    ap_ref = -F.logsigmoid(beta * (naive_batch_nll(idk_logits, idk_labels) - naive_batch_nll(logits, labels))).mean()
    assert ap_loss(logits, labels, idk_logits, idk_labels, beta).item() == pytest.approx(ap_ref.item() / beta, abs=1e-4)
    ref = logits + 0.5 * torch.randn_like(logits)
    npo_ref = -F.logsigmoid(beta * (naive_batch_nll(logits, labels) - naive_batch_nll(ref, labels))).mean() * 2 / beta
    assert npo_loss(logits, labels, ref, beta).item() == pytest.approx(npo_ref.item(), abs=1e-4)
    mask = labels[:, 1:] != -100
    p_ref = F.softmax(ref[:, :-1], -1)[mask]
    p_cur = F.softmax(logits[:, :-1], -1)[mask]
    kl_ref = (p_ref * (p_ref.log() - p_cur.log())).sum(-1).mean()
    assert kl_loss(logits, ref, labels).item() == pytest.approx(kl_ref.item(), abs=1e-4)


def test_kl_reductions():
    """Per-position KL (0, 0.2, 0.4, 1.0) with positions 1 and 2 predicting answer tokens: 0.3 over answer tokens,
    0.4 as open-unlearning's batchmean (every position of the flattened batch). Transcribed: their
    compute_kl_divergence is F.kl_div(log q, log p_ref, reduction="batchmean", log_target=True) on (B*T, V)."""
    ref = torch.zeros(1, 4, 2, dtype=torch.float64)  # uniform reference
    targets = torch.tensor([0.0, 0.2, 0.4, 1.0], dtype=torch.float64)

    def two_class_with_kl(k: float) -> torch.Tensor:  # logits whose KL(uniform || softmax) is k
        from scipy.optimize import brentq

        q = brentq(lambda q: 0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q)) - k, 1e-12, 0.5) if k else 0.5
        return torch.tensor([math.log(q), math.log(1 - q)], dtype=torch.float64)

    logits = torch.stack([two_class_with_kl(k.item()) for k in targets])[None]
    labels = torch.tensor([[-100, -100, 1, 0]])  # positions 1 and 2 predict answer tokens
    labels_shifted_from = torch.tensor([[-100, -100, 5, 6]])
    assert kl_loss(logits, ref, labels_shifted_from).item() == pytest.approx((0.2 + 0.4) / 2, abs=1e-9)
    assert kl_loss(logits, ref, labels, "batchmean").item() == pytest.approx(1.6 / 4, abs=1e-9)
    theirs = F.kl_div(F.log_softmax(logits.view(-1, 2), -1), F.log_softmax(ref.view(-1, 2), -1),
                      reduction="batchmean", log_target=True)
    assert kl_loss(logits, ref, labels, "batchmean").item() == pytest.approx(theirs.item(), rel=1e-12)
    with pytest.raises(ValueError, match=r"unknown KL reduction 'mean'; one of tokens, batchmean$"):
        kl_loss(logits, ref, labels, "mean")


def test_me_chunking_matches_unchunked(random_batch, monkeypatch):
    import ops.token_values as kernels

    logits, labels = random_batch
    whole = me_loss(logits, labels)
    monkeypatch.setattr(kernels, "ME_CHUNK_TOKENS", 3)
    assert me_loss(logits, labels).item() == pytest.approx(whole.item(), abs=1e-12)


@pytest.mark.parametrize("fn", [nll_loss, ga_loss, me_loss])
def test_masked_positions_have_no_effect_and_grads_are_finite(random_batch, fn):
    logits, labels = random_batch
    logits = logits.clone().requires_grad_(True)
    value = fn(logits, labels)
    value.backward()
    assert torch.isfinite(logits.grad).all()
    # positions that predict a masked label get no gradient
    predicts_masked = torch.cat([labels[:, 1:] == -100, torch.ones(3, 1, dtype=torch.bool)], dim=1)
    assert logits.grad[predicts_masked].abs().max().item() == 0.0
    changed = logits.detach().clone()
    changed[predicts_masked] = 100.0
    assert fn(changed, labels).item() == pytest.approx(value.item(), abs=1e-12)


def test_me_loss_in_bfloat16_is_close_and_finite(random_batch):
    logits, labels = random_batch
    value = me_loss(logits.to(torch.bfloat16), labels)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(naive_me(logits, labels).item(), rel=2e-2)


def test_empty_selection_is_zero_not_nan():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    labels = torch.full((1, 4), -100)
    assert me_loss(logits, labels).item() == 0.0
    assert nll_loss(logits, labels).item() == 0.0
    kl = kl_loss(logits, logits.detach() + 1.0, labels)
    assert kl.item() == 0.0 and kl.requires_grad  # still part of the graph: backward works on every rank
    kl.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_default_beta_is_0_1():
    """The original scripts' beta: with the defaults the value equals beta = 0.1 given explicitly, and differs
    from beta = 1."""
    torch.manual_seed(3)
    a, b = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 5, 7, dtype=torch.float64)
    la, lb = torch.randint(0, 7, (2, 5)), torch.randint(0, 7, (2, 5))
    for fn, args in ((ap_loss, (a, la, b, lb)), (npo_loss, (a, la, b)), (dpo_loss, (a, la, b, lb, b * 0.5, a * 0.5))):
        default = fn(*args).item()
        assert default == pytest.approx(fn(*args, beta=0.1).item(), abs=1e-12)
        assert default != pytest.approx(fn(*args, beta=1.0).item(), abs=1e-3)


def term_inputs(term, *, ref: bool, hidden: bool, logits: bool) -> dict:
    """Outputs for the term's own parts only, with reference outputs, hidden states and logits as asked."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for part in term.parts:
        labels = torch.randint(0, 7, (2, 6), generator=g)
        labels[:, :2] = -100

        def draw(*shape):
            return torch.randn(*shape, dtype=torch.float64, generator=g)

        out[part] = PartOutput(logits=draw(2, 6, 7) if logits else None, labels=labels,
                               ref_logits=draw(2, 6, 7) if ref and logits else None,
                               hidden=draw(2, 6, 5) if hidden else None,
                               ref_hidden=draw(2, 6, 5) if ref and hidden else None)
    return out


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_each_terms_flags_say_what_it_reads(loss_type):
    """A term computes from exactly what its flags make the trainer compute: its own parts (no other part is
    given), reference outputs only with needs_ref, hidden states only with needs_hidden, logits unless
    needs_logits is False; and every input it asks for is read (leaving it out fails), so no flag costs a forward
    pass for nothing."""
    params = LossParams(steering=torch.randn(5, dtype=torch.float64))
    for term in filter(None, LOSSES[loss_type]):
        asked = {"ref": term.needs_ref, "hidden": term.needs_hidden, "logits": term.needs_logits}
        value = term.compute(term_inputs(term, **asked), params)
        assert value.dim() == 0 and torch.isfinite(value)
        units = term.units({part: o.labels for part, o in term_inputs(term, **asked).items()}, params)
        assert int(units) > 0
        for flag in [name for name, on in asked.items() if on]:
            with pytest.raises((TypeError, AttributeError)):
                term.compute(term_inputs(term, **{**asked, flag: False}), params)
    assert needs_idk(loss_type) == any(t is not None and bool({"forget_idk", "retain_idk"} & set(t.parts))
                                       for t in LOSSES[loss_type])


def test_me_backward_equals_autograd_of_the_original(random_batch, monkeypatch):
    """The hand-written backward of ME equals autograd through the naive softmax/uniform/kl_div version,
    also when the positions are split into several chunks."""
    import ops.token_values as kernels

    logits, labels = random_batch
    monkeypatch.setattr(kernels, "ME_CHUNK_TOKENS", 4)
    ours = logits.clone().requires_grad_(True)
    naive = logits.clone().requires_grad_(True)
    (2.0 * me_loss(ours, labels)).backward()
    (2.0 * naive_me(naive, labels)).backward()
    assert torch.allclose(ours.grad, naive.grad, atol=1e-12)  # the same formula, 1e-12 inside its log
    small = logits[:1, :6, :7].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: me_loss(z, labels[:1, :6]), (small,))
    assert torch.autograd.gradcheck(lambda z: me_loss(z, labels[:1, :6], floor=0.0), (small,))


def test_the_settings_defaults_are_the_sources_values():
    """Fidelity: every loss hyper-parameter defaults to its source's value (the one declaration the terms, the
    config and the flags all read), and the loss functions' own defaults are those settings."""
    import dataclasses
    import inspect

    from trainer.losses import (
        LossSettings,
        ceu_loss,
        kl_loss,
        me_loss,
        npo_loss,
        satimp_loss,
        simnpo_loss,
        undial_loss,
        wga_loss,
    )

    sources = {  # value, where it comes from
        "beta": (0.1, "forget_idk_ap.py of the ATEC original (AP), the NPO paper"),
        "simnpo_beta": (4.5, "open-unlearning configs/trainer/SimNPO.yaml"),
        "simnpo_delta": (0.0, "open-unlearning configs/trainer/SimNPO.yaml"),
        "undial_beta": (10.0, "open-unlearning configs/trainer/UNDIAL.yaml"),
        "wga_beta": (1.0, "open-unlearning configs/trainer/WGA.yaml"),
        "satimp_beta1": (5.0, "open-unlearning configs/trainer/SatImp.yaml"),
        "satimp_beta2": (1.0, "open-unlearning configs/trainer/SatImp.yaml"),
        "ceu_skip_tokens": (1, "the CE-U paper's footnote"),
        "me_floor": (1e-12, "forget_me_gd.py of the ATEC original"),
        "kl_reduction": ("tokens", "ours (docs/fidelity.md; batchmean is open-unlearning's)"),
    }
    settings = LossSettings()
    assert {f.name for f in dataclasses.fields(LossSettings)} == set(sources)
    for name, (value, source) in sources.items():
        assert getattr(settings, name) == value, (name, source)
    defaults = {(me_loss, "floor"): "me_floor", (npo_loss, "beta"): "beta", (simnpo_loss, "beta"): "simnpo_beta",
                (simnpo_loss, "delta"): "simnpo_delta", (undial_loss, "beta"): "undial_beta",
                (wga_loss, "beta"): "wga_beta", (satimp_loss, "beta1"): "satimp_beta1",
                (satimp_loss, "beta2"): "satimp_beta2", (ceu_loss, "skip_tokens"): "ceu_skip_tokens",
                (kl_loss, "reduction"): "kl_reduction"}
    for (fn, parameter), name in defaults.items():
        assert inspect.signature(fn).parameters[parameter].default == sources[name][0], (fn.__name__, parameter)


def test_kl_batchmean_on_a_batch_whose_shape_is_not_square():
    """(B, T, V) = (2, 3, 5), peaked logits: batchmean is the per-position KL summed over all six positions / 6,
    and tokens the mean over the positions that predict an answer token (a reshape over the wrong axis, or a
    softmax over it, gives another number)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen) * 4
    ref = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen) * 4
    per_position = [[float((F.softmax(ref[b, t], -1) * (F.log_softmax(ref[b, t], -1) - F.log_softmax(logits[b, t], -1)))
                           .sum()) for t in range(3)] for b in range(2)]
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 3]])  # positions (0, 0), (0, 1), (1, 1) predict answers
    assert kl_loss(logits, ref, labels, "batchmean").item() == pytest.approx(sum(map(sum, per_position)) / 6,
                                                                             rel=1e-12)
    expected = (per_position[0][0] + per_position[0][1] + per_position[1][1]) / 3
    assert kl_loss(logits, ref, labels, "tokens").item() == pytest.approx(expected, rel=1e-12)


def test_every_terms_units_are_its_means_divisor_counted_by_hand():
    """The trainer divides each term's summed value by its units over a whole step: forget answer tokens 2 + 0 + 3
    = 5 over 3 rows, 2 of them answered; CE-U leaves each answered row's first token out (1 + 2); retain 4 tokens
    over 2 rows and 8 positions; forget_idk 2 tokens."""
    import trainer.losses as losses

    labels = {"forget": torch.tensor([[-100, -100, 5, 6, -100], [-100] * 5, [-100, -100, 7, 8, 9]]),
              "retain": torch.tensor([[-100, 1, 2, 3], [-100, -100, -100, 4]]),
              "forget_idk": torch.tensor([[-100, 1, 1]]), "retain_idk": torch.tensor([[-100, 2, 2, 2]])}
    hp = LossParams()
    expected = {"GA": 5, "ME": 5, "IDK": 2, "NPO": 3, "DPO": 3, "SIMNPO": 2, "UNDIAL": 5, "WGA": 5, "SATIMP": 5,
                "CEU": 3, "PDU_F": 5, "RMU_F": 3, "GD": 4, "KL": 4, "AP": 2, "PDU_R": 4, "RMU_R": 2}
    for name, count in expected.items():
        assert int(getattr(losses, name).units(labels, hp)) == count, name
    assert int(losses.KL.units(labels, LossParams(kl_reduction="batchmean"))) == 8
    assert int(losses.CEU.units(labels, LossParams(ceu_skip_tokens=0))) == 5
    named = {id(t) for pair in losses.LOSSES.values() for t in pair if t is not None}
    assert named <= {id(getattr(losses, name)) for name in expected}  # every term of the table is counted above


def test_which_methods_read_hidden_states_or_a_reference():
    """RMU's terms read a layer's hidden states; a reference is read by NPO, DPO and UNDIAL (their forget terms),
    by every +KL retain term, and by plain RMU (its retain term matches the reference's hidden states)."""
    from trainer.losses import needs_hidden, needs_reference

    assert [t for t in LOSSES if needs_hidden(t)] == ["RMU", "RMU+GD"]
    expected = {t for t in LOSSES if t.split("+")[0] in ("NPO", "DPO", "UNDIAL") or t.endswith("+KL")} | {"RMU"}
    assert {t for t in LOSSES if needs_reference(t)} == expected
    assert needs_hidden("RMU") is True and needs_reference("ME+GD") is False
