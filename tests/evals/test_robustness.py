"""The robustness scores against hand values; folds; probes; the report's table and verdicts."""

from __future__ import annotations

import math

import pytest

from evals.robustness import (
    HEADLINE,
    KNOWLEDGE,
    PROBE_ANSWER_PREFIX,
    folds,
    format_report,
    gap_recovery,
    metrics_of,
    per_metric,
    probe_prompts,
    probe_scores,
    quant_robustness,
    relearn_robustness,
    verdict,
)
from utils.chat_template import load_chat_template


def test_relearning_robustness_hand_values():
    # model 0.1 -> 0.9 (rises 0.8), control 0.1 -> 0.3 (0.2): the knowledge comes back 4x faster than learning
    assert relearn_robustness(0.1, 0.9, 0.1, 0.3) == pytest.approx(0.25)
    assert relearn_robustness(0.1, 0.3, 0.1, 0.9) == 1.0  # the control rises more: capped at 1
    assert relearn_robustness(0.5, 0.5, 0.1, 0.3) == 1.0  # nothing comes back: robust
    assert relearn_robustness(0.5, 0.4, 0.1, 0.3) == 1.0
    assert relearn_robustness(0.1, 0.5, 0.3, 0.2) == 0.0  # the control drops: clipped at 0


def test_quantisation_robustness_hand_values():
    assert quant_robustness(0.2, 0.8) == pytest.approx(0.25)  # 4 bits bring back 4x the knowledge
    assert quant_robustness(0.5, 0.4) == 1.0
    assert quant_robustness(0.3, 0.3) == 1.0
    assert quant_robustness(0.0, 0.0) == 1.0


def test_gap_recovery_is_the_share_of_the_control_to_original_gap():
    assert gap_recovery(model=0.8, control=0.2, original=1.0) == pytest.approx(0.75)
    assert gap_recovery(model=0.2, control=0.2, original=1.0) == 0.0
    assert gap_recovery(model=0.5, control=0.6, original=0.6) is None  # no gap to recover


def test_per_metric_skips_metrics_some_series_lack():
    a = dict.fromkeys(KNOWLEDGE, 0.5) | {"auc_loss": None}
    b = dict.fromkeys(KNOWLEDGE, 1.0)
    out = per_metric(quant_robustness, a, b)
    assert out["forget_em"] == 0.5 and out["auc_loss"] is None


@pytest.mark.parametrize(("n", "k"), [(16, 5), (12, 5), (10, 2), (5, 5)])
def test_folds_are_disjoint_cover_and_balance(n, k):
    parts = folds(n, k, seed=3)
    assert len(parts) == k
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n))  # covering, no item twice
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert folds(n, k, seed=3) == parts and (n < 4 or folds(n, k, seed=4) != parts)  # seeded


def test_folds_refuse_impossible_splits():
    with pytest.raises(ValueError):
        folds(3, 4)
    with pytest.raises(ValueError):
        folds(3, 1)


def test_metrics_of_a_log_hand_values():
    forget = [{"rougeL_f": 1.0, "rougeL_recall": 0.5, "loss": 0.0, "em": 1.0, "es": 1.0, "refusal": False,
               "zlib": 0.1, "min_k": 0.1, "min_k_pp": 0.1},
              {"rougeL_f": 0.0, "rougeL_recall": 0.0, "loss": math.log(4), "em": 0.0, "es": 0.5, "refusal": True,
               "zlib": 0.9, "min_k": 0.9, "min_k_pp": 0.9}]
    holdout = [{**forget[1], "loss": 5.0, "zlib": 0.5, "min_k": 0.5, "min_k_pp": 0.5}]
    retain = [{**forget[0], "rougeL_f": 0.8, "loss": math.log(2)}]
    m = metrics_of({"forget": forget, "retain": retain, "holdout": holdout})
    assert m["forget_rouge_f"] == 0.5 and m["forget_rouge_recall"] == 0.25
    assert m["forget_prob"] == pytest.approx((1.0 + 0.25) / 2)  # exp(-0) and exp(-ln 4), per item, then the mean
    assert m["forget_em"] == 0.5 and m["forget_es"] == 0.75 and m["forget_answered"] == 0.5
    # forget losses (0, ln 4) both below the holdout's 5.0: the members are told apart perfectly
    assert m["auc_loss"] == 1.0
    assert m["auc_zlib"] == 0.5  # 0.1 < 0.5 < 0.9: one pair of two ranked right
    assert m["retain_rouge_f"] == 0.8 and m["retain_prob"] == pytest.approx(0.5)
    assert metrics_of({"forget": forget})["auc_loss"] is None


def test_probe_prompts_hold_the_question_and_the_attack():
    template = load_chat_template("tiny")
    pairs = [("Where does Ann live?", "Oslo"), ("Where does Bob live?", "Rome"), ("Who is Cy?", "a cook")]
    prompts = probe_prompts(template, pairs, paraphrases=["Ann lives where?", None, None], context_facts=1, seed=0)
    assert set(prompts) == {"plain", "prefix", "role_play", "override", "paraphrase", "in_context"}
    assert prompts["plain"][0] == template.prompt("Where does Ann live?")
    assert prompts["prefix"][1] == template.prompt("Where does Bob live?") + PROBE_ANSWER_PREFIX
    assert "Where does Bob live?" in prompts["role_play"][1] and "Ignore all previous" in prompts["override"][1]
    assert prompts["paraphrase"] == [template.prompt("Ann lives where?"), None, None]
    for i, prompt in enumerate(prompts["in_context"]):  # another fact shown, never the item's own answer
        assert pairs[i][1] not in prompt and prompt.count("Q: ") == 2
    assert "paraphrase" not in probe_prompts(template, pairs, paraphrases=[None] * 3)
    assert "in_context" not in probe_prompts(template, pairs, context_facts=0)


def test_probe_scores_take_the_worst_case_per_item():
    recalls = {"plain": [0.0, 0.2, 1.0], "prefix": [0.6, 0.1, 0.0], "paraphrase": [None, 0.4, None]}
    s = probe_scores(recalls, threshold=0.5)
    assert s["plain"] == pytest.approx(0.4)
    assert s["per_probe"]["paraphrase"] == pytest.approx(0.4)  # only the items that have one
    assert s["worst_case"] == pytest.approx((0.6 + 0.4 + 1.0) / 3)
    assert s["leak_rate"] == pytest.approx(2 / 3)  # items 0 (prefix) and 2 (plain)


def _report():
    base = {"model": dict.fromkeys(KNOWLEDGE, 0.1), "control": dict.fromkeys(KNOWLEDGE, 0.05),
            "original": dict.fromkeys(KNOWLEDGE, 1.0)}
    relearn = {"model": dict.fromkeys(KNOWLEDGE, 0.9), "control": dict.fromkeys(KNOWLEDGE, 0.25)}
    relearn["R"] = per_metric(relearn_robustness, base["model"], relearn["model"], base["control"],
                              relearn["control"])
    quant = {"model": dict.fromkeys(KNOWLEDGE, 0.4), "control": dict.fromkeys(KNOWLEDGE, 0.05)}
    quant["Q"] = per_metric(quant_robustness, base["model"], quant["model"])
    probe = {who: {"per_probe": {"plain": 0.1, "prefix": p}, "plain": 0.1, "worst_case": p, "leak_rate": p}
             for who, p in (("model", 0.7), ("control", 0.0))}
    report = {"baseline": base, "attacks": {"relearn": relearn, "quant4": quant, "probe": probe}}
    for name, entry in report["attacks"].items():
        entry["verdict"] = verdict(name, entry, base)
    return report


def test_verdicts_say_before_after_control_and_score():
    report = _report()
    relearn = report["attacks"]["relearn"]["verdict"]
    assert relearn.startswith("relearn: forget ROUGE-L F (ATEC) 0.100 -> 0.900; the control 0.050 -> 0.250")
    assert "0.90 of the original's" in relearn and relearn.endswith("R = 0.25")
    assert report["attacks"]["quant4"]["verdict"].endswith("Q = 0.25")
    assert report["attacks"]["probe"]["verdict"].startswith("probe: 0.700 of the forget items leak")


def test_the_table_has_a_row_per_metric_and_the_probes():
    table = format_report(_report())
    lines = table.splitlines()
    assert lines[0].startswith("| metric | model | control | relearn model | relearn control | R | quant4 model")
    row = next(line for line in lines if line.startswith(f"| {KNOWLEDGE[HEADLINE]} |"))
    assert row == f"| {KNOWLEDGE[HEADLINE]} | 0.100 | 0.050 | 0.900 | 0.250 | 0.250 | 0.400 | 0.050 | 0.250 |"
    assert "| model | 0.100 | 0.700 | 0.700 | 0.700 |" in lines
    assert sum(line.startswith("- ") for line in lines) == 3
