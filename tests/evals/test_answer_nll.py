"""Answers to one question scored with one forward of the question (evals/answer_nll.prompt_shared_nll)."""

from __future__ import annotations

import pytest
import torch

from dataset.encoding import encode_qa
from evals.answer_nll import prompt_shared_nll
from ops.head import fusable_head


def one_forward(model, sample: dict) -> tuple[float, int]:
    """Summed NLL and count of the sample's counted labels from one forward of the whole sample."""
    ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor(sample["labels"])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")
    return nll.item(), int((labels[1:] != -100).sum())


@pytest.fixture()
def samples(target, template):
    """Three questions with 4, 2 and 1 answers (one answer twice, one cut at max_length so it has no EOS),
    interleaved so that answers of one question are not neighbours."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target["model"])
    (q1, a1), (q2, a2), (q3, a3) = target["forget_pairs"][:3]
    pairs = [(q1, a1), (q2, a2), (q1, "Short."), (q3, a3), (q1, a2), (q2, "Another answer."), (q1, a1),
             (q1, a3 + " " + a3 + " " + a3)]
    out = [encode_qa(tok, template, q, a, 40 if i == len(pairs) - 1 else 200, mask=True)
           for i, (q, a) in enumerate(pairs)]
    assert out[-1]["input_ids"][-1] != tok.eos_token_id and len(out[-1]["input_ids"]) == 40  # truncated
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_equal_to_one_forward_per_sample(target, samples, batch_size):
    """Each sample's summed NLL and count equal one forward of that sample (the memorised target: real
    attention over the question), whether a question's 5 answers share a batch (16), are split across
    batches (3) or run one by one (1); duplicates get the same value."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target["model"]).eval()
    assert fusable_head(model, inference=True) is not None
    got = prompt_shared_nll(model, samples, pad_id=0, batch_size=batch_size)
    for (total, count), sample in zip(got, samples, strict=True):
        expected_total, expected_count = one_forward(model, sample)
        assert count == expected_count
        assert total == pytest.approx(expected_total, rel=1e-4, abs=1e-4)
    assert got[0] == got[6]
    assert len({round(t, 3) for t, _ in got}) == 7  # the values really differ (only the duplicate repeats)


def test_logits_path_when_the_head_is_not_fused(target, samples):
    """A model whose head cannot be fused (an architecture outside FUSABLE_ARCHITECTURES) is scored from its
    logits: the same values."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target["model"]).eval()
    fused = prompt_shared_nll(model, samples, pad_id=0, batch_size=4)
    model.config.model_type = "unfusable"
    assert fusable_head(model, inference=True) is None
    unfused = prompt_shared_nll(model, samples, pad_id=0, batch_size=4)
    for (a, n), (b, m) in zip(fused, unfused, strict=True):
        assert n == m and a == pytest.approx(b, rel=1e-5, abs=1e-5)
