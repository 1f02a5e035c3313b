"""The one-command demo, at a reduced size: the whole pipeline through the real scripts."""

from __future__ import annotations

import pytest

import demo
from utils.files import write_jsonl
from zoo.demo_data import choice_items, definition_items, privacy_items, qa_items


@pytest.mark.slow
def test_demo_forgets_privacy_and_keeps_the_rest(tmp_path):
    train = privacy_items(16, seed=1) + definition_items()[:8] + choice_items()[:4] + qa_items()[:4]
    write_jsonl(tmp_path / "train.jsonl", train)
    summary = demo.main(["--model", "tiny", "--out", str(tmp_path / "demo"),
                         "--train_data", str(tmp_path / "train.jsonl"),
                         "--valid_data", str(tmp_path / "train.jsonl"), "--num_epochs", "10"])  # 16 items: 40 steps
    before, after = summary["before"], summary["after"]
    print({k: (before[k], after[k]) for k in ("rouge_l_privacy", "rouge_l_noun", "choice_acc", "score")})
    assert before["rouge_l_privacy"] > 0.9  # the target memorised the private facts
    assert after["rouge_l_privacy"] < 0.3  # ... and forgot them
    assert after["rouge_l_noun"] > before["rouge_l_noun"] - 0.15  # kept the definitions
    assert after["choice_acc"] >= before["choice_acc"] - 0.25  # and the multiple choice
    assert after["score"] > before["score"]
    assert after["judge"]["win"] + after["judge"]["tie"] + after["judge"]["loss"] == 4
    png = tmp_path / "demo" / "demo_me_gd.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "demo" / "merged_model" / "me_gd" / "config.json").is_file()


def test_stage_output_keeps_the_log_and_redraws_progress_bars(capsys):
    """A stage's tqdm lines go to the terminal (once per distinct state), everything else is kept for a
    failure report, and the exit status comes back."""
    import sys

    code = ("import sys; sys.stderr.write('step 50%|##   | 1/2\\r step 100%|#####| 2/2\\r step 100%|#####| 2/2\\n');"
            "print('a log line'); sys.exit(3)")
    returncode, log = demo.run_with_progress([sys.executable, "-c", code], {})
    shown = capsys.readouterr().out
    assert returncode == 3 and "a log line" in log and "%|" not in log
    assert shown.count("100%|") == 1 and "50%|" in shown and "a log line" not in shown
