"""evaluate_unlearning.py and evals/unlearning.py on the tiny memorised model: planted members, the
Reference and GradNorm scores computed by hand, PrivLeak, the output files, and input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import evaluate_unlearning
from evals.unlearning import grad_norms, summarise, token_stats
from tests.conftest import run_script
from utils.utils import load_chat_template, write_jsonl
from zoo.demo_data import privacy_items


@pytest.fixture(scope="module")
def holdout(target, tmp_path_factory) -> Path:
    """16 more people drawn by the same generator: facts of the same kind the target never saw (the
    target's forget set is privacy_items(16, seed=0), the first 16 of the same draw)."""
    items = privacy_items(32, seed=0)
    assert [i["conversations"][0]["value"] for i in items[:16]] == [q for q, _ in target["forget_pairs"]]
    path = tmp_path_factory.mktemp("holdout") / "holdout.jsonl"
    write_jsonl(path, items[16:])
    return path


def run_eval(target, holdout, out: Path, *extra: str) -> dict:
    evaluate_unlearning.main(["--model_path", str(target["model"]), "--model_family", "tiny",
                              "--forget", str(target["forget"]), "--holdout", str(holdout),
                              "--retain", str(target["retain"]), "--refusals", str(target["idk"]),
                              "--max_new_tokens", "30", "--out", str(out), *extra])
    return json.loads((out / "summary.json").read_text())


def test_planted_members_are_detected_and_unlearning_hides_them(target, holdout, tmp_path):
    """The target memorised the forget facts: every MIA score separates them from holdout facts (AUC near 1),
    EM and ES are 1 on them. After ME+GD (5 epochs, lr 5e-3, --mask true) the loss AUC moves toward 0.5
    (measured 0.676; before 1.000) and PrivLeak against the target's own AUC is negative."""
    from trainer.recipe import main_for

    before = run_eval(target, holdout, tmp_path / "target")
    for score in ("loss", "zlib", "min_k", "min_k_pp", "gradnorm"):
        assert before["auc"][score] > 0.95, score
    assert "reference" not in before["auc"]  # no adapter, no --reference_model
    assert before["sets"]["forget"]["em"] == 1.0 and before["sets"]["forget"]["es"] == 1.0
    assert before["sets"]["holdout"]["es"] < 0.2
    assert before["sets"]["forget"]["refusal_rate"] == 0.0

    final = main_for("me_gd", ["--model_path", str(target["model"]), "--model_family", "tiny",
                               "--forget_data_path", str(target["forget"]), "--retain_data_path", str(target["retain"]),
                               "--num_epochs", "5", "--bs", "4", "--lr", "5e-3", "--mask", "true",
                               "--save_root", str(tmp_path / "adapter")], "test")
    after = run_eval(target, holdout, tmp_path / "me_gd", "--adapter", str(final), "--retain_only_summary",
                     str(tmp_path / "target" / "summary.json"))
    print({k: round(v, 3) for k, v in after["auc"].items()})
    assert abs(after["auc"]["loss"] - 0.5) < abs(before["auc"]["loss"] - 0.5) - 0.1
    assert after["sets"]["forget"]["loss"] > before["sets"]["forget"]["loss"] + 2
    assert after["priv_leak"]["loss"] == pytest.approx((after["auc"]["loss"] - before["auc"]["loss"])
                                                       / before["auc"]["loss"] * 100)
    assert "reference" in after["auc"]  # the adapter's base is the reference

    log = json.loads((tmp_path / "me_gd" / "eval_log.json").read_text())
    assert set(log) == {"forget", "retain", "holdout"} and len(log["forget"]) == 16
    row = log["forget"][0]
    assert {"question", "answer", "generated", "rougeL_f", "rougeL_recall", "refusal", "loss", "zlib", "min_k",
            "min_k_pp", "reference", "gradnorm", "em", "es"} <= set(row)
    assert (tmp_path / "me_gd" / "summary.md").read_text().startswith("| set |")


def test_reference_and_gradnorm_by_hand(target, trained_adapter):
    """Reference = the adapter model's mean answer NLL minus the base's, per item; GradNorm = the L2 norm of
    the gradient of that NLL over every weight, with the requires_grad flags left as they were."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.logprobs import token_nll
    from evals.unlearning import reference_nlls

    template = load_chat_template("tiny")
    tokenizer = AutoTokenizer.from_pretrained(target["model"])
    base = AutoModelForCausalLM.from_pretrained(target["model"]).eval()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(target["model"]), str(trained_adapter))
    model.eval()
    pairs = target["forget_pairs"][:3]
    ours = [sum(-x for x in st.logprobs) / len(st.logprobs) for st in token_stats(model, tokenizer, template, pairs)]
    with model.disable_adapter():
        ref = reference_nlls(model, tokenizer, template, pairs)
    assert ref == pytest.approx(reference_nlls(base, tokenizer, template, pairs), abs=1e-6)
    assert ours[0] - ref[0] != pytest.approx(0.0, abs=1e-4)  # the adapter moved the forget answers

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    norms = grad_norms(model, tokenizer, template, pairs[:1])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    from dataset.data_module import ForgetRetainCollator, encode_qa

    batch = ForgetRetainCollator(tokenizer.pad_token_id)(
        [{"x": encode_qa(tokenizer, template, *pairs[0], 512, mask=True)}])["x"]
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    nll, mask = token_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                          batch["labels"])
    grads = torch.autograd.grad(nll.sum() / mask.sum(), params, allow_unused=True)
    expected = math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))
    assert norms[0] == pytest.approx(expected, rel=1e-5)


def test_summary_leaves_out_scores_that_are_missing_and_needs_both_sets():
    row = {"rougeL_f": 1.0, "rougeL_recall": 1.0, "loss": 0.1, "em": 1.0, "es": 1.0, "refusal": None,
           "zlib": 0.01, "min_k": 0.2, "min_k_pp": 0.3, "reference": None, "gradnorm": 2.0}
    other = {**row, "loss": 3.0, "zlib": 0.2, "min_k": 4.0, "min_k_pp": 1.0, "gradnorm": 9.0}
    summary = summarise({"forget": [row, row], "holdout": [other]})
    assert summary["auc"] == {"loss": 1.0, "zlib": 1.0, "min_k": 1.0, "min_k_pp": 1.0, "gradnorm": 1.0}
    assert summary["sets"]["forget"]["refusal_rate"] is None and summary["sets"]["forget"]["items"] == 2
    assert "auc" not in summarise({"forget": [row]})
    leak = summarise({"forget": [row], "holdout": [other]}, {"auc": {"loss": 0.5}})["priv_leak"]
    assert leak == {"loss": pytest.approx(100.0)}


def test_input_mistakes_are_one_line_errors(target, holdout, tmp_path, capsys):
    base = ["--model_path", str(target["model"]), "--model_family", "tiny", "--out", str(tmp_path / "o")]
    code, err = run_script(evaluate_unlearning, [*base, "--forget", str(tmp_path / "missing.jsonl")], capsys)
    assert code == 2 and "missing.jsonl" in err and "Traceback" not in err
    bad = tmp_path / "summary.json"
    bad.write_text("{}")
    code, err = run_script(evaluate_unlearning, [*base, "--forget", str(target["forget"]), "--retain_only_summary",
                                                 str(bad)], capsys)
    assert code == 2 and "no 'auc' field" in err
    code, err = run_script(evaluate_unlearning, [*base, "--forget", str(target["forget"]), "--min_k", "0"], capsys)
    assert code == 2 and "--min_k" in err
    assert not (tmp_path / "o").exists()  # nothing written on a mistake
