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


def test_the_plot_prints_every_value_and_which_way_is_better(tmp_path):
    """plot() on made-up numbers (no model): a PNG that loads; every bar's value is printed on it, every group
    says which way is better, and the general-knowledge and refusal bars of the table are there."""
    from matplotlib.image import imread

    rows = [{"step": s, "loss": 3.0 - s / 10, "forget_loss": -s / 10, "retain_loss": 1.0} for s in range(1, 11)]
    before = {"rouge_l_privacy": 0.888, "rouge_l_noun": 0.173, "choice_acc": 0.833, "score": 0.224,
              "general_vs_target": 1.0, "general_vs_untouched": 0.466, "refusal_forget": 0.0, "refusal_other": 0.0,
              "judge": {"win": 0, "tie": 4, "loss": 0}}
    after = {"rouge_l_privacy": 0.048, "rouge_l_noun": None, "choice_acc": 0.917, "score": 0.699,
             "general_vs_target": 0.662, "general_vs_untouched": 0.469, "refusal_forget": 0.917,
             "refusal_other": 0.042, "judge": {"win": 0, "tie": 4, "loss": 0}}
    fig = demo.build_figure(rows, before, after, "smollm2, idk_ap", "SmolLM2")
    losses, atec, extra = fig.axes
    assert [line.get_label() for line in losses.get_lines()] == ["total", "forget", "retain"]

    def values(ax):
        return sorted(t.get_text() for t in ax.texts)

    def ticks(ax):
        return [t.get_text() for t in ax.get_xticklabels()]

    assert values(atec) == sorted(["0.888", "0.173", "0.833", "0.224", "0.048", "n/a", "0.917", "0.699"])
    assert values(extra) == sorted(["1.000", "0.466", "0.000", "0.000", "0.662", "0.469", "0.917", "0.042"])
    assert [t.split("\n")[-1] for t in ticks(atec)] == ["(lower is better)"] + ["(higher is better)"] * 3
    assert [t.split("\n")[-1] for t in ticks(extra)] == ["(higher is better)"] * 2 + [
        "(IDK+AP: higher is better)", "(lower is better)"]  # a refusal is only the targeted method's aim
    assert "untouched SmolLM2" in ticks(extra)[1] and "forget" in ticks(extra)[2]

    # the tiny model has no general probe: only the refusal bars in the second panel
    tiny = {k: v for k, v in before.items() if not k.startswith("general")}
    refusals = demo.build_figure(rows, tiny, tiny, "tiny").axes[2]
    assert [t.split("\n")[0] for t in ticks(refusals)] == ["refusal rate,"] * 2
    assert refusals.get_title() == "refusal rates"

    png = tmp_path / "demo_idk_ap.png"
    demo.plot(rows, before, after, png, "smollm2, idk_ap", "SmolLM2")
    image = imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 1000
