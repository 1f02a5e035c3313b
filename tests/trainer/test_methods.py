"""The open-unlearning methods (SimNPO, UNDIAL, WGA, SatImp, CE-U, PDU, RMU): hand values, naive float64
references written from the papers, masking, gradient direction, and the reference implementations' faults."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import (
    LOSSES,
    LossParams,
    PartOutput,
    ceu_loss,
    dual_step,
    pdu_forget_loss,
    rmu_loss,
    satimp_loss,
    simnpo_loss,
    skip_first_answer_tokens,
    steering_vector,
    undial_loss,
    wga_loss,
)

LN2, LN3 = math.log(2), math.log(3)


@pytest.fixture()
def batch():
    """Logits (3, 9, 11) in float64; row 0 has a masked question, row 2 padding, row 1 every label counted."""
    torch.manual_seed(7)
    logits = torch.randn(3, 9, 11, dtype=torch.float64) * 2
    labels = torch.randint(0, 11, (3, 9))
    labels[0, :4] = -100
    labels[2, 6:] = -100
    return logits, labels


def counted_positions(labels: torch.Tensor):
    """(row, position t, label y) for every t whose next label y = labels[row, t + 1] is counted."""
    return [(b, t, int(labels[b, t + 1])) for b in range(labels.size(0)) for t in range(labels.size(1) - 1)
            if labels[b, t + 1] != -100]


# --------------------------------------------------------------------------- naive references, one position at a time


def naive_simnpo(logits, labels, beta, delta):
    rows = []
    for b in range(labels.size(0)):
        nlls = [-F.log_softmax(logits[b, t], -1)[y] for bb, t, y in counted_positions(labels) if bb == b]
        mean = torch.stack(nlls).mean() if nlls else torch.tensor(0.0, dtype=torch.float64)
        rows.append(-(2 / beta) * F.logsigmoid(beta * (mean - delta)))
    return torch.stack(rows).mean()


def naive_undial(logits, labels, ref, beta):
    terms = []
    for b, t, y in counted_positions(labels):
        adjusted = ref[b, t].clone()
        adjusted[y] -= beta
        q = torch.softmax(adjusted, -1)
        terms.append(-(q * F.log_softmax(logits[b, t], -1)).sum())
    return torch.stack(terms).mean()


def naive_weighted(logits, labels, weight):
    terms = []
    for b, t, y in counted_positions(labels):
        logp = F.log_softmax(logits[b, t], -1)[y]
        terms.append(weight(math.exp(logp.item())) * logp)  # -(w * nll) = w * logp
    return torch.stack(terms).mean()


def naive_ceu(logits, labels, skip):
    terms, seen = [], {}
    for b, t, y in counted_positions(labels):
        seen[b] = seen.get(b, 0) + 1
        if seen[b] <= skip:
            continue
        target = logits[b, t].detach().clone()  # the paper's target is a fixed distribution
        target[y] = float("-inf")
        q = torch.softmax(target, -1)
        terms.append(-(q * F.log_softmax(logits[b, t], -1)).sum())
    return torch.stack(terms).mean()


def naive_pdu(logits, labels):
    return torch.stack([(logits[b, t].max() - logits[b, t].mean()) ** 2
                        for b, t, _ in counted_positions(labels)]).mean()


def naive_rmu(hidden, target, labels):
    rows = []
    for b in range(labels.size(0)):
        per_token = [((hidden[b, t] - target[b, t]) ** 2).mean() for t in range(labels.size(1)) if labels[b, t] != -100]
        rows.append(torch.stack(per_token).mean())
    return torch.stack(rows).mean()


# --------------------------------------------------------------------------- hand values (each docstring's)


def test_simnpo_hand_value():
    """Two uniform binary tokens: mean NLL ln 2; beta = 1, delta = 0: -2 log sigmoid(ln 2) = -2 log(2/3)."""
    logits, labels = torch.zeros(1, 3, 2, dtype=torch.float64), torch.tensor([[-100, 0, 1]])
    assert simnpo_loss(logits, labels, beta=1.0).item() == pytest.approx(2 * math.log(1.5), abs=1e-12)
    """delta = ln 2 cancels the NLL: -2 log sigmoid(0) = 2 ln 2."""
    assert simnpo_loss(logits, labels, beta=1.0, delta=LN2).item() == pytest.approx(2 * LN2, abs=1e-12)
    """Length-normalised: a third uniform token leaves the mean at ln 2, so the value does not change."""
    longer = torch.zeros(1, 4, 2, dtype=torch.float64)
    assert simnpo_loss(longer, torch.tensor([[-100, 0, 1, 1]]), beta=1.0).item() == pytest.approx(2 * math.log(1.5))


def test_undial_hand_value():
    """Uniform reference over 2 classes, beta = ln 3: adjusted logits (-ln 3, 0) for y = 0 give the target
    (1/4, 3/4). Against a uniform model the cross-entropy is ln 2; against p = (1/4, 3/4) it is the target's
    entropy 1/4 ln 4 + 3/4 ln 4/3."""
    zeros, labels = torch.zeros(1, 2, 2, dtype=torch.float64), torch.tensor([[-100, 0]])
    assert undial_loss(zeros, labels, zeros, beta=LN3).item() == pytest.approx(LN2, abs=1e-12)
    matched = torch.tensor([[[0.0, LN3], [0.0, 0.0]]], dtype=torch.float64)
    entropy = 0.25 * math.log(4) + 0.75 * math.log(4 / 3)
    assert undial_loss(matched, labels, zeros, beta=LN3).item() == pytest.approx(entropy, abs=1e-12)


def test_wga_and_satimp_hand_values():
    """One binary token, logits (0, ln 3), y = 1: p = 3/4, NLL ln(4/3). WGA (beta 1): -(3/4) ln(4/3).
    SatImp (1, 1): weight 3/4 * 1/4 = 3/16. Uniform logits, SatImp (1, 1): p = 1/2, weight 1/4: -(1/4) ln 2."""
    logits, labels = torch.tensor([[[0.0, LN3], [0.0, 0.0]]], dtype=torch.float64), torch.tensor([[-100, 1]])
    assert wga_loss(logits, labels, beta=1.0).item() == pytest.approx(-0.75 * math.log(4 / 3), abs=1e-12)
    assert satimp_loss(logits, labels, 1.0, 1.0).item() == pytest.approx(-(3 / 16) * math.log(4 / 3), abs=1e-12)
    assert satimp_loss(torch.zeros_like(logits), labels, 1.0, 1.0).item() == pytest.approx(-0.25 * LN2, abs=1e-12)
    """beta = 0 (WGA) is plain gradient ascent: -ln(4/3); SatImp with beta2 = 0 is WGA with beta = beta1."""
    assert wga_loss(logits, labels, beta=0.0).item() == pytest.approx(-math.log(4 / 3), abs=1e-12)
    assert satimp_loss(logits, labels, 2.0, 0.0).item() == pytest.approx(wga_loss(logits, labels, 2.0).item())


def test_ceu_hand_value_and_skipped_tokens():
    """Logits (0, ln 3, 0), y = 1: target (1/2, 0, 1/2), model p = (1/5, 3/5, 1/5): loss ln 5 (skip 0).
    With the default skip of 1 the only answer token is left out: nothing counts, the loss is 0."""
    logits = torch.tensor([[[0.0, LN3, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[-100, 1]])
    assert ceu_loss(logits, labels, skip_tokens=0).item() == pytest.approx(math.log(5), abs=1e-12)
    assert ceu_loss(logits, labels).item() == 0.0
    assert skip_first_answer_tokens(torch.tensor([[-100, 4, 5, 6], [7, 8, -100, -100]]), 2).tolist() == [
        [-100, -100, -100, 6], [-100, -100, -100, -100]]
    """The skip counts predicted tokens: with every label counted (--mask false) label 0 is never predicted,
    so skipping 1 leaves out label 1 (predicted at position 0), not label 0."""
    three = torch.tensor([[[0.0, LN3, 0.0], [0.0, LN3, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    assert ceu_loss(three, torch.tensor([[2, 0, 1]]), skip_tokens=1).item() == pytest.approx(math.log(5))


def test_pdu_hand_value():
    """Logits (0, ln 3): max - mean = ln(3)/2, squared ln(3)^2/4. Uniform logits: 0."""
    labels = torch.tensor([[-100, 1]])
    logits = torch.tensor([[[0.0, LN3], [9.0, -9.0]]], dtype=torch.float64)
    assert pdu_forget_loss(logits, labels).item() == pytest.approx(LN3**2 / 4, abs=1e-12)
    assert pdu_forget_loss(torch.zeros_like(logits), labels).item() == 0.0


def test_rmu_hand_value():
    """H = 2: hidden (1, 3) at the one counted token, target (0, 0): (1 + 9) / 2 = 5; the uncounted token
    (hidden (100, 100)) adds nothing. A second row at distance (1, 1): 1; the mean over rows is 3."""
    hidden = torch.tensor([[[100.0, 100.0], [1.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    labels = torch.tensor([[-100, 5], [5, 5]])
    assert rmu_loss(hidden[:1], torch.zeros(2, dtype=torch.float64), labels[:1]).item() == pytest.approx(5.0)
    assert rmu_loss(hidden, torch.zeros(2, dtype=torch.float64), labels).item() == pytest.approx(3.0)


def test_dual_step_hand_values():
    """weight 1, step 0.5: retain loss 3 over a bound 1 -> 1 + 0.5 * 2 = 2; under it (0.2 vs 1) ->
    1 - 0.4 = 0.6; far under -> clipped at 0."""
    assert dual_step(1.0, 3.0, 1.0, 0.5) == pytest.approx(2.0)
    assert dual_step(1.0, 0.2, 1.0, 0.5) == pytest.approx(0.6)
    assert dual_step(1.0, 0.0, 10.0, 0.5) == 0.0


def test_steering_vector_is_fixed_and_has_length_c():
    a, b = steering_vector(64, 6.5, seed=3), steering_vector(64, 6.5, seed=3)
    assert torch.equal(a, b) and a.norm().item() == pytest.approx(6.5, rel=1e-6) and (a >= 0).all()
    assert not torch.equal(a, steering_vector(64, 6.5, seed=4))


# --------------------------------------------------------------------------- naive references on random logits


def test_each_loss_equals_its_naive_float64_reference(batch):
    logits, labels = batch
    torch.manual_seed(8)
    ref = logits + torch.randn_like(logits)
    assert simnpo_loss(logits, labels, 4.5, 0.3).item() == pytest.approx(
        naive_simnpo(logits, labels, 4.5, 0.3).item(), rel=1e-10)
    assert undial_loss(logits, labels, ref, 10.0).item() == pytest.approx(
        naive_undial(logits, labels, ref, 10.0).item(), rel=1e-10)
    assert wga_loss(logits, labels, 1.5).item() == pytest.approx(
        naive_weighted(logits, labels, lambda p: p**1.5).item(), rel=1e-10)
    assert satimp_loss(logits, labels, 5.0, 1.0).item() == pytest.approx(
        naive_weighted(logits, labels, lambda p: p**5 * (1 - p)).item(), rel=1e-10)
    for skip in (0, 1, 2):
        assert ceu_loss(logits, labels, skip).item() == pytest.approx(naive_ceu(logits, labels, skip).item(), rel=1e-10)
    assert pdu_forget_loss(logits, labels).item() == pytest.approx(naive_pdu(logits, labels).item(), rel=1e-10)
    hidden, target = torch.randn(3, 9, 6, dtype=torch.float64), torch.randn(3, 9, 6, dtype=torch.float64)
    assert rmu_loss(hidden, target, labels).item() == pytest.approx(naive_rmu(hidden, target, labels).item(),
                                                                    rel=1e-10)


def test_gradients_equal_the_naive_references(batch):
    """Same gradients as the naive versions, whose weights and targets are constants: a weight or target that
    let gradient through (WGA/SatImp's p, CE-U's target, UNDIAL's reference) would differ here."""
    logits, labels = batch
    ref = (logits + 1.0).requires_grad_(True)
    pairs = [
        (lambda z: wga_loss(z, labels, 1.5), lambda z: naive_weighted(z, labels, lambda p: p**1.5)),
        (lambda z: satimp_loss(z, labels, 2.0, 1.0), lambda z: naive_weighted(z, labels, lambda p: p**2 * (1 - p))),
        (lambda z: ceu_loss(z, labels, 1), lambda z: naive_ceu(z, labels, 1)),
        (lambda z: undial_loss(z, labels, ref, 3.0), lambda z: naive_undial(z, labels, ref.detach(), 3.0)),
        (lambda z: simnpo_loss(z, labels, 2.0, 0.1), lambda z: naive_simnpo(z, labels, 2.0, 0.1)),
        (lambda z: pdu_forget_loss(z, labels), lambda z: naive_pdu(z, labels)),
    ]
    for ours, naive in pairs:
        a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        ours(a).backward()
        naive(b).backward()
        assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    assert ref.grad is None  # UNDIAL's reference never receives a gradient


LOGIT_LOSSES = {
    "SimNPO": lambda z, y, ref: simnpo_loss(z, y),
    "UNDIAL": lambda z, y, ref: undial_loss(z, y, ref),
    "WGA": lambda z, y, ref: wga_loss(z, y),
    "SatImp": lambda z, y, ref: satimp_loss(z, y, 1.0, 1.0),
    "CE-U": lambda z, y, ref: ceu_loss(z, y, 0),
    "PDU": lambda z, y, ref: pdu_forget_loss(z, y),
}


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_masked_positions_have_no_effect_and_grads_are_finite(batch, name):
    """Positions predicting a masked label (question, padding, the last) get no gradient and may hold anything,
    including what would break the reference implementations (UNDIAL averaged over them)."""
    logits, labels = batch
    fn = LOGIT_LOSSES[name]
    ref = logits.flip(-1)
    z = logits.clone().requires_grad_(True)
    value = fn(z, labels, ref)
    value.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    predicts_masked = torch.cat([labels[:, 1:] == -100, torch.ones(3, 1, dtype=torch.bool)], dim=1)
    assert z.grad[predicts_masked].abs().max().item() == 0.0
    changed, changed_ref = logits.clone(), ref.clone()
    changed[predicts_masked], changed_ref[predicts_masked] = 50.0, -50.0
    assert fn(changed, labels, changed_ref).item() == pytest.approx(value.item(), abs=1e-12)


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_a_gradient_step_lowers_the_answer_likelihood(batch, name):
    """Every forget term pushes p(y) of a memorised answer down (y's logit 4 above the rest's mean): one small
    gradient step on the logits lowers the summed log p(y)."""
    logits, labels = batch
    logits = logits.clone()
    for b, t, y in counted_positions(labels):
        logits[b, t, y] = logits[b, t].max() + 4.0
    fn = LOGIT_LOSSES[name]
    z = logits.clone().requires_grad_(True)
    fn(z, labels, logits.clone()).backward()

    def answer_logp(x):
        return sum(F.log_softmax(x[b, t], -1)[y] for b, t, y in counted_positions(labels))

    stepped = logits - 0.05 * z.grad / z.grad.norm()
    assert answer_logp(stepped) < answer_logp(logits) - 1e-4


def test_undial_does_not_read_a_minus_100_label_as_a_token():
    """The reference implementation scatters the -100 label into the vocabulary (index -1, the last token)
    and averages over prompt positions. Here a masked position changes nothing: the loss with a question
    prefix equals the loss of the answer alone."""
    torch.manual_seed(4)
    z, ref = torch.randn(1, 6, 5, dtype=torch.float64), torch.randn(1, 6, 5, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, -100, 2, 0, 4]])
    answer_only = undial_loss(z[:, 2:], labels[:, 2:], ref[:, 2:])
    assert undial_loss(z, labels, ref).item() == pytest.approx(answer_only.item(), abs=1e-12)


def test_pdu_reads_the_position_that_predicts_each_answer_token():
    """Answer labels at positions 2 and 3: the counted logits are positions 1 and 2 (they predict them). The
    reference implementation counts positions 2 and 3 (one late): a margin placed only at position 3 must
    change nothing, one at position 1 must count."""
    labels = torch.tensor([[-100, -100, 1, 0]])
    at = torch.zeros(1, 4, 2, dtype=torch.float64)
    at[0, 3] = torch.tensor([4.0, 0.0])
    assert pdu_forget_loss(at, labels).item() == 0.0
    at = torch.zeros(1, 4, 2, dtype=torch.float64)
    at[0, 1] = torch.tensor([4.0, 0.0])
    assert pdu_forget_loss(at, labels).item() == pytest.approx(4.0 / 2)  # (4 - 2)^2 over 2 positions


def test_rmu_pulls_hidden_states_to_the_target_and_ignores_unlabelled_tokens():
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, -100, 1, 2, 3], [4, 5, 6, -100, -100]])
    target = steering_vector(8, 6.5, seed=0).double()
    rmu_loss(hidden, target, labels).backward()
    assert hidden.grad[labels == -100].abs().max().item() == 0.0
    before = (hidden.detach() - target).norm(dim=-1)[labels != -100]
    after = (hidden.detach() - 0.1 * hidden.grad - target).norm(dim=-1)[labels != -100]
    assert (after < before).all()


@pytest.mark.parametrize("name", ["SimNPO", "UNDIAL", "WGA", "SatImp", "CE-U", "PDU"])
def test_empty_selection_is_zero_and_backward_works(name):
    z = torch.randn(1, 4, 5, requires_grad=True)
    value = LOGIT_LOSSES[name](z, torch.full((1, 4), -100), z.detach())
    value.backward()
    assert value.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


# --------------------------------------------------------------------------- the table


def test_table_terms_compute_with_the_default_hyper_parameters(batch):
    """Each new --loss_type's forget term reads its own default (paper / open-unlearning) from LossParams."""
    logits, labels = batch
    ref = logits.flip(-1)
    hidden = torch.randn(3, 9, 6, dtype=torch.float64)
    part = PartOutput(logits, labels, ref, hidden, hidden * 0.5)
    outputs = {"forget": part, "retain": part}
    params = LossParams(steering=torch.ones(6, dtype=torch.float64))
    expected = {
        "SimNPO": simnpo_loss(logits, labels, 4.5, 0.0),
        "UNDIAL": undial_loss(logits, labels, ref, 10.0),
        "WGA": wga_loss(logits, labels, 1.0),
        "SatImp": satimp_loss(logits, labels, 5.0, 1.0),
        "CE-U": ceu_loss(logits, labels, 1),
        "PDU": pdu_forget_loss(logits, labels),
        "RMU": rmu_loss(hidden, torch.ones(6, dtype=torch.float64), labels),
    }
    for name, value in expected.items():
        assert LOSSES[name][0].compute(outputs, params).item() == pytest.approx(value.item(), rel=1e-12), name
    assert LOSSES["RMU"][1].compute(outputs, params).item() == pytest.approx(
        rmu_loss(hidden, hidden * 0.5, labels).item())
    changed = LossParams(simnpo_beta=1.0, undial_beta=1.0, wga_beta=2.0, satimp_beta1=1.0, ceu_skip_tokens=0)
    for name in ("SimNPO", "UNDIAL", "WGA", "SatImp", "CE-U"):
        assert LOSSES[name][0].compute(outputs, changed).item() != pytest.approx(expected[name].item(), rel=1e-6)
