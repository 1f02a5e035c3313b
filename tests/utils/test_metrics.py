"""ATEC metrics on hand-made answers whose values are worked out in the docstrings."""

from __future__ import annotations

import pytest

from utils.metrics import atec_rouge_l, atec_score, category, choice_correct, parse_verdict


def test_rouge_l_hand_values():
    """'alpha beta gamma delta' vs 'alpha gamma delta epsilon': LCS = alpha gamma delta (3 words),
    P = R = 3/4, F = 0.75. Chinese: jieba splits 他住在北京 / 他住在上海 into 他 住 在 北京 / 上海: F = 3/4."""
    assert atec_rouge_l("alpha beta gamma delta", "alpha gamma delta epsilon") == pytest.approx(0.75, abs=1e-6)
    assert atec_rouge_l("他住在北京", "他住在上海") == pytest.approx(0.75, abs=1e-6)
    assert atec_rouge_l("same words here", "same words here") == pytest.approx(1.0, abs=1e-6)


def test_rouge_l_zero_cases():
    assert atec_rouge_l("gold answer", "") == 0.0
    assert atec_rouge_l("gold answer", " ") == 0.0
    assert atec_rouge_l("gold answer", ".") == 0.0  # rouge finds no word in it
    assert atec_rouge_l("word " * 600, "word " * 600) == 0.0  # longer than 2,048 characters once segmented


def test_choice_and_verdicts():
    assert choice_correct("解析……【答案】B", "我认为【答案】 B ")
    assert not choice_correct("【答案】B", "B")  # no marker in the answer
    assert not choice_correct("【答案】B", "【答案】C【答案】B")  # only the first marker counts
    assert parse_verdict("<think>回答1更准确，赢</think>结论：赢") == "loss"
    assert parse_verdict("<think>...</think>\n输") == "win"
    assert parse_verdict("<think>...</think>\n平") == "tie"
    assert parse_verdict("赢") == "tie"  # no </think>: a tie
    assert category("noun_definition_3") == "noun_definition" and category("misc") is None


def test_atec_score_hand_value():
    """privacy: 0.75 and 0 (empty) → 0.375; noun: 1.0; choice: 1 of 2 → 0.5; qa: 1 win, 1 loss → 0.5.
    score = 1/2 [(0.5 + 1.0 + 0.5)/3 + (1 - 0.375)] = 1/2 (2/3 + 0.625) = 0.6458333."""
    keys = ["privacy_1", "privacy_2", "noun_definition_1", "choice_1", "choice_2", "qa_1", "qa_2"]
    golds = ["alpha beta gamma delta", "secret", "x y", "【答案】B", "【答案】C", "q1", "q2"]
    answers = ["alpha gamma delta epsilon", "", "x y", "【答案】B", "C", "a1", "a2"]
    result = atec_score(keys, golds, answers, {5: "win", 6: "loss"})
    assert result.rouge_l_privacy == pytest.approx(0.375, abs=1e-6)
    assert result.rouge_l_noun == pytest.approx(1.0, abs=1e-6)
    assert result.choice_acc == 0.5 and result.participant_win == 0.5
    assert result.score == pytest.approx(0.5 * (2 / 3 + 0.625), abs=1e-6)
    assert result.counts == {"privacy": 2, "noun_definition": 1, "choice": 2, "qa": 2, "other": 0}
    assert result.judge == {"win": 1, "tie": 0, "loss": 1}
    skipped = atec_score(keys, golds, answers, None)
    assert skipped.score is None and skipped.participant_win is None and skipped.choice_acc == 0.5
