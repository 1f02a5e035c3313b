"""The stopping rule on planted trajectories, and evaluation during training on the tiny target: the step it
selects is saved as it was, and its logged numbers are the stand-alone evaluation's, on 1 and 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import base_args, launch_two_processes, run_script
from trainer.selection import SelectRule, badness, choose, eval_rows, parse_rule
from utils.errors import UserError


def trajectory(*points: tuple[float, float]) -> list[dict]:
    """Rows of (forget_prob, retain_prob) at steps 0, 10, 20, ..."""
    return [{"step": 10 * i, "eval_forget_prob": f, "eval_retain_prob": r} for i, (f, r) in enumerate(points)]


# forget falls steadily; utility holds until step 30, then collapses (the GA story)
PLANTED = trajectory((0.95, 0.90), (0.60, 0.88), (0.30, 0.80), (0.10, 0.73), (0.01, 0.20))


def test_best_is_the_lowest_forget_value_above_the_utility_floor():
    row, why = choose(PLANTED, SelectRule("best", "forget_prob"), utility_floor=0.8)
    assert row["step"] == 30  # 0.73 >= 0.8 x 0.90 = 0.72; step 40 (0.01) lost its utility
    assert "best forget_prob (0.1)" in why and "0.8 x the starting 0.9" in why


def test_best_with_the_floor_at_085_stops_before_the_utility_drop():
    row, _ = choose(PLANTED, SelectRule("best", "forget_prob"), utility_floor=0.85)
    assert row["step"] == 20  # 0.85 x 0.90 = 0.765: step 20's 0.80 passes, step 30's 0.73 does not
    row, _ = choose(PLANTED, SelectRule("best", "forget_prob"), utility_floor=0.0)
    assert row["step"] == 40  # no floor: the collapsed model forgets best


def test_first_below_is_muses_rule_against_a_control_value():
    row, why = choose(PLANTED, SelectRule("first_below", "forget_prob", 0.35))
    assert row["step"] == 20 and "0.3 <= 0.35" in why
    row, why = choose(PLANTED, SelectRule("first_below", "forget_prob", 0.05))
    assert row is None and "reached forget_prob <= 0.05" in why  # step 40 would, but is under the floor


def test_the_starting_model_is_never_selected_and_is_required():
    flat = trajectory((0.10, 0.9), (0.50, 0.9))
    row, _ = choose(flat, SelectRule("best", "forget_prob"))
    assert row["step"] == 10  # step 0 is better, but it is the model before unlearning
    row, why = choose(flat[1:], SelectRule("best", "forget_prob"))
    assert row is None and "step 0" in why


def test_orientation_of_each_kind_of_metric():
    assert badness("forget_prob", 0.2) < badness("forget_prob", 0.3)
    assert badness("retain_prob", 0.9) < badness("retain_prob", 0.8)
    assert badness("auc_loss", 0.52) < badness("auc_loss", 0.40) < badness("auc_loss", 0.9)
    rows = [{"step": 0, "eval_auc_loss": 1.0, "eval_retain_prob": 1.0},
            {"step": 5, "eval_auc_loss": 0.2, "eval_retain_prob": 1.0},
            {"step": 9, "eval_auc_loss": 0.6, "eval_retain_prob": 1.0}]
    assert choose(rows, SelectRule("best", "auc_loss"))[0]["step"] == 9
    assert choose(rows, SelectRule("best", "retain_prob"))[0]["step"] == 5  # ties: the earliest


def test_rules_parse_and_bad_ones_are_one_clear_error():
    assert parse_rule("none") is None
    assert parse_rule("best:forget_es") == SelectRule("best", "forget_es")
    assert parse_rule("first_below:forget_prob=0.2") == SelectRule("first_below", "forget_prob", 0.2)
    assert str(parse_rule("first_below:forget_prob=0.2")) == "first_below:forget_prob=0.2"
    for bad, says in (("worst:forget_prob", "expected best:<metric>"), ("best:accuracy", "the metric one of"),
                      ("first_below:forget_prob", "needs a number"), ("best:forget_prob=1", "takes no value")):
        with pytest.raises(UserError, match=says):
            parse_rule(bad)


def test_eval_rows_keeps_one_row_per_step():
    log = [{"step": 0, "eval_forget_prob": 0.9}, {"step": 1, "loss": 2.0}, {"step": 2, "eval_forget_prob": 0.5},
           {"step": 2, "eval_forget_prob": 0.4}]
    assert eval_rows(log) == [{"step": 0, "eval_forget_prob": 0.9}, {"step": 2, "eval_forget_prob": 0.4}]


def standalone_metrics(target: dict, adapter: Path, out: Path) -> dict:
    """evaluate_unlearning.py on an adapter, reduced to the in-training metrics."""
    import evaluate_unlearning
    from evals.robustness import metrics_of

    evaluate_unlearning.main(["--model_path", str(target["model"]), "--model_family", "tiny", "--adapter",
                              str(adapter), "--forget", str(target["forget"]), "--retain", str(target["retain"]),
                              "--max_new_tokens", "8", "--out", str(out)])
    return metrics_of(json.loads((out / "eval_log.json").read_text()))


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


TRAIN = ("--num_epochs", "3", "--bs", "4", "--lr", "2e-3", "--eval_strategy", "epoch", "--select",
         "best:forget_prob", "--utility_floor", "0.5", "--save_total_limit", "0")


def check_selection(target: dict, run: Path, tmp_path: Path) -> dict:
    import torch

    rows = eval_rows([json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()])
    assert [r["step"] for r in rows] == [0, 4, 8, 12]  # before training, then each epoch's end
    record = json.loads((run / "selection.json").read_text())
    chosen = next(r for r in rows if r["step"] == record["step"])
    expected, _ = choose(rows, parse_rule("best:forget_prob"), utility_floor=0.5)
    assert record["step"] == expected["step"] and record["value"] == chosen["eval_forget_prob"]
    assert json.loads((run / "selected" / "selection.json").read_text()) == record
    saved = adapter_tensors(run / "selected")
    epoch = record["step"] // 4
    source = run / (f"checkpoint-epoch-{epoch}" if epoch < 3 else "final_lora_model")
    reference = adapter_tensors(source)
    assert saved.keys() == reference.keys() and all(torch.equal(saved[k], reference[k]) for k in saved)
    standalone = standalone_metrics(target, run / "selected", tmp_path / "standalone")
    for metric in ("forget_prob", "forget_em", "forget_es", "retain_prob"):
        assert chosen[f"eval_{metric}"] == pytest.approx(standalone[metric], abs=1e-5), metric
    return record


@pytest.mark.slow
def test_the_selected_step_is_saved_as_it_was_and_scores_as_evaluated(target, tmp_path):
    import forget_me_gd

    final = forget_me_gd.main(base_args(target, tmp_path, *TRAIN, "--output_dir", str(tmp_path / "run")))
    record = check_selection(target, final.parent, tmp_path)
    args = json.loads((final.parent / "run_args.json").read_text())
    assert args["select"] == "best:forget_prob" and args["utility_floor"] == 0.5  # declared before training
    assert record["step"] > 0


@pytest.mark.slow
def test_two_processes_select_and_score_as_one_evaluation(target, tmp_path):
    proc = launch_two_processes("forget_me_gd.py", base_args(target, tmp_path, *TRAIN, "--bs", "2",
                                                             "--output_dir", str(tmp_path / "run")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_selection(target, tmp_path / "run", tmp_path)


def test_bad_evaluation_options_stop_before_training(target, tmp_path, capsys):
    import forget_me_gd

    for extra, says in (
        (["--select", "best:forget_prob"], "give --eval_steps N or --eval_strategy epoch"),
        (["--eval_strategy", "steps"], "needs --eval_steps N"),
        (["--eval_steps", "2", "--select", "best:auc_loss"], "give --eval_holdout"),
        (["--eval_steps", "2", "--select", "best:forget_rouge_f"], "add --eval_generate"),
        (["--eval_steps", "2", "--select", "best:forget_answered"], "not scored during training"),
        (["--eval_steps", "2", "--eval_holdout", str(tmp_path / "none.jsonl")], "none.jsonl"),
    ):
        code, err = run_script(forget_me_gd, base_args(target, tmp_path, *extra), capsys)
        assert code == 2 and says in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "adapter").exists()


def test_a_resumed_run_keeps_only_a_selection_made_up_to_its_checkpoint(tmp_path):
    from trainer.recipe import _clear_selection

    def run_with_selection_at(step: int, rule: str = "best:forget_prob") -> Path:
        (tmp_path / "selected").mkdir(parents=True, exist_ok=True)
        for path in (tmp_path / "selected" / "selection.json", tmp_path / "selection.json"):
            path.write_text(json.dumps({"step": step, "rule": rule}))
        return tmp_path

    checkpoint = tmp_path / "checkpoint-epoch-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 8, "log_history": []}))
    _clear_selection(run_with_selection_at(8), str(checkpoint), "best:forget_prob")
    assert (tmp_path / "selected").is_dir() and (tmp_path / "selection.json").is_file()
    _clear_selection(run_with_selection_at(8), str(checkpoint), "best:forget_es")  # another rule: gone
    assert not (tmp_path / "selected").exists()
    _clear_selection(run_with_selection_at(12), str(checkpoint), "best:forget_prob")  # after the checkpoint
    assert not (tmp_path / "selected").exists() and not (tmp_path / "selection.json").exists()
    _clear_selection(run_with_selection_at(4), None)  # a fresh run starts with none
    assert not (tmp_path / "selected").exists()
