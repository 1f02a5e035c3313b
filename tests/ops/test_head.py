"""The fused head: per-token NLL and ME straight from the output head's input, chunk by chunk, equal in value
and gradient to the same losses on whole logits; the trainer uses it only where every term allows."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ops import token_values
from ops.head import HeadInput
from ops.token_values import head_token_values, sequence_nll, token_nll
from tests.conftest import base_args
from trainer import recipe
from trainer.losses import LOSSES, LossParams, PartOutput, me_loss, nll_loss


def hidden_and_head(seed: int = 0, rows: int = 3, length: int = 7, width: int = 5, vocab: int = 11):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, length, width, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows, length), generator=gen)
    labels[0, :3] = -100  # a masked prompt
    labels[2, 5:] = -100  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 4, 256])
@pytest.mark.parametrize("loss", ["nll", "me", "sequence_nll"])
def test_fused_values_and_gradients_equal_whole_logits(monkeypatch, chunk, loss):
    """In float64, for chunks smaller than, across and larger than the 21 positions: each loss from
    ``HeadInput(hidden, W)`` equals the same loss of ``hidden @ W.T``, and so does its gradient in ``hidden``."""
    monkeypatch.setattr(token_values, "HEAD_CHUNK_TOKENS", chunk)
    hidden, weight, labels = hidden_and_head()
    fn = {"nll": nll_loss, "me": me_loss, "sequence_nll": lambda z, y: (sequence_nll(z, y) ** 2).sum()}[loss]
    whole = fn(hidden @ weight.t(), labels)
    (grad_whole,) = torch.autograd.grad(whole, hidden)
    fused = fn(HeadInput(hidden, weight), labels)
    (grad_fused,) = torch.autograd.grad(fused, hidden)
    assert fused.item() == pytest.approx(whole.item(), rel=1e-12)
    assert torch.allclose(grad_fused, grad_whole, rtol=1e-10, atol=1e-12)


def test_fused_values_by_hand():
    """One position, H = 1, W = (0, ln 3)^T, h = 1: logits (0, ln 3), softmax (1/4, 3/4). NLL of y = 0 is ln 4
    with gradient in h = (p - onehot) . W = (3/4) ln 3; ME = logsumexp - mean - ln 2 = ln 4 - ln(3)/2 - ln 2
    with gradient (p - 1/2) . W = (1/4) ln 3."""
    weight = torch.tensor([[0.0], [math.log(3)]], dtype=torch.float64)
    hidden = torch.ones(1, 2, 1, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, 0]])
    for kind, value, grad in (("nll", math.log(4), 0.75 * math.log(3)),
                              ("me", math.log(4) - math.log(3) / 2 - math.log(2), 0.25 * math.log(3))):
        values, mask = head_token_values(HeadInput(hidden, weight), labels, kind)
        assert mask.tolist() == [[True, False]]
        assert values[0, 0].item() == pytest.approx(value) and values[0, 1].item() == 0.0
        (g,) = torch.autograd.grad(values.sum(), hidden)
        assert g[0, 0, 0].item() == pytest.approx(grad) and g[0, 1, 0].item() == 0.0


def test_token_nll_of_head_input_reports_the_counted_mask():
    hidden, weight, labels = hidden_and_head()
    nll, mask = token_nll(HeadInput(hidden, weight), labels)
    ref_nll, ref_mask = token_nll(hidden @ weight.t(), labels)
    assert torch.equal(mask, ref_mask) and torch.allclose(nll, ref_nll)
    assert HeadInput(hidden, weight).size() == (3, 7, 11) and HeadInput(hidden, weight).size(-1) == 11


# --------------------------------------------------------------------------- through the trainer


def make_trainer(target, tmp_path, loss_type: str, fused: bool, *extra: str):
    from dataset.data_module import ForgetRetainCollator
    from trainer.unlearn_trainer import UnlearnTrainer

    args = recipe.build_parser("me_gd", "").parse_args(base_args(
        target, tmp_path, "--loss_type", loss_type, "--lora_dropout", "0", "--mask", "true",
        "--fused_head_loss", str(fused).lower(), *extra))
    template = recipe.load_chat_template("tiny")
    tokenizer = recipe.load_tokenizer(args, template)
    dataset = recipe.build_dataset(args, tokenizer, template)
    torch.manual_seed(0)
    # float64: the two paths sum in different orders, and in float32 that alone differs by ~1e-4 of a small
    # gradient's norm on some CPUs; in float64 any real difference stands far above the rounding
    model = recipe.build_model(args, template, False).double()
    for name, param in model.named_parameters():  # LoRA B = 0 would make the adapter invisible
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    ref_model = copy.deepcopy(model) if args.lora_r == 0 else None  # as recipe.train makes it
    training_args = recipe.build_training_args(args, tmp_path / "run", False)
    training_args.fused_head = fused
    trainer = UnlearnTrainer(model=model, args=training_args, train_dataset=dataset, ref_model=ref_model)
    batch = ForgetRetainCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    return trainer, model, batch


FUSABLE = sorted(name for name, (f, r) in LOSSES.items() if f.fusable or (r is not None and r.fusable))


@pytest.mark.parametrize("loss_type", FUSABLE)
def test_trainer_loss_and_gradients_equal_with_and_without_the_fused_head(target, tmp_path, loss_type):
    """Every objective with a fusable term, on the tiny model: the same loss and the same LoRA gradients
    whether the logits are built or not (float64: losses to 1e-10, each gradient tensor to 1e-8 of its
    norm)."""
    results = []
    for fused in (False, True):
        trainer, model, batch = make_trainer(target, tmp_path / str(fused), loss_type, fused, "--rmu_layer", "1")
        model.train()
        loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        kinds = {name: type(out.logits).__name__ for name, out in outputs.items()}
        results.append((loss.item(), grads, kinds, trainer.fused_parts))
    (plain, plain_grads, plain_kinds, _), (fused, fused_grads, fused_kinds, fused_parts) = results
    assert fused_parts and all(fused_kinds[p] == "HeadInput" for p in fused_parts)
    assert all(kind == "Tensor" for kind in plain_kinds.values())
    assert fused == pytest.approx(plain, rel=1e-10, abs=1e-12)
    assert plain_grads.keys() == fused_grads.keys() and plain_grads
    for name, grad in plain_grads.items():  # sums in another order: relative to the tensor's norm
        assert (fused_grads[name] - grad).norm() <= 1e-8 * grad.norm() + 1e-15, name


def test_only_parts_whose_every_term_is_fusable_are_fused(target, tmp_path):
    """ME+KL: the forget part (ME) is fused, the retain part is not (KL reads whole distributions); full
    fine-tuning trains the head, so the policy's head is not fused while the frozen reference's would be."""
    trainer, _, _ = make_trainer(target, tmp_path, "ME+KL", True)
    assert trainer.fused_parts == {"forget"} and trainer._head is not None
    trainer, _, _ = make_trainer(target, tmp_path / "full", "NPO+GD", True, "--lora_r", "0")
    assert trainer._head is None and trainer._ref_head is not None


def test_loss_terms_marked_fusable_take_a_head_input():
    """The table's contract: a fusable term computes from HeadInput parts (and reference parts) without
    touching whole logits, giving its value on the built logits."""
    gen = torch.Generator().manual_seed(3)
    outputs, plain = {}, {}
    for name in ("forget", "retain", "forget_idk", "retain_idk"):
        hidden = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)
        ref_hidden = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)
        weight = torch.randn(9, 4, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 9, (2, 6), generator=gen)
        labels[:, :2] = -100
        outputs[name] = PartOutput(HeadInput(hidden, weight), labels, HeadInput(ref_hidden, weight))
        plain[name] = PartOutput(hidden @ weight.t(), labels, ref_hidden @ weight.t())
    checked = 0
    for terms in LOSSES.values():
        for term in terms:
            if term is not None and term.fusable:
                value = term.compute(outputs, LossParams()).item()
                assert value == pytest.approx(term.compute(plain, LossParams()).item(), rel=1e-10)
                checked += 1
    assert checked >= 20
