"""Evaluation split across processes (evals/shard.py): batch b on process b mod N, results gathered in item
order; the 2-process logs of evaluate_tofu.py, --eval_tofu and evaluate_unlearning.py equal 1-process logs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import evaluate_tofu
import evaluate_unlearning
from evals.shard import SINGLE, Shard
from tests.conftest import base_args, launch_two_processes


def test_batches_are_dealt_round_robin():
    assert [b for b in range(7) if Shard(0, 2).owns(b)] == [0, 2, 4, 6]
    assert [b for b in range(7) if Shard(1, 2).owns(b)] == [1, 3, 5]
    assert all(SINGLE.owns(b) for b in range(7))


def test_gather_orders_items_and_reports_a_lost_one():
    assert SINGLE.gather({1: "b", 0: "a"}, 2) == ["a", "b"]
    with pytest.raises(RuntimeError, match=r"lost items \[1\]"):
        SINGLE.gather({0: "a"}, 2)


def write_tofu_sets(target: dict, folder: Path, items: int = 5) -> list[str]:
    """Four small sets in TOFU's format from the target model's pairs (forget and retain from its own facts),
    as the four --*_path options."""
    folder.mkdir(parents=True, exist_ok=True)
    flags = []
    for flag, pairs in (("--forget_path", target["forget_pairs"]), ("--retain_path", target["retain_pairs"]),
                        ("--real_authors_path", target["retain_pairs"][5:]),
                        ("--world_facts_path", target["forget_pairs"][5:])):
        rows = [{"question": q, "answer": a, "paraphrased_answer": a.lower(),
                 "perturbed_answer": [pairs[(i + 1) % len(pairs)][1], pairs[(i + 2) % len(pairs)][1]]}
                for i, (q, a) in enumerate(pairs[:items])]
        path = folder / f"{flag[2:]}.json"
        path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
        flags += [flag, str(path)]
    return flags


@pytest.mark.slow
def test_tofu_evaluation_on_two_processes_equals_one_process(target, tmp_path):
    """5 items a set at --tofu_batch_size 2: 3 batches, two on process 0 and one on process 1 (and the 10
    perturbed answers: 5 batches). The gathered log is the 1-process log, value for value (each batch is
    formed exactly as one process forms it), written once."""
    sets = write_tofu_sets(target, tmp_path / "sets")
    common = ["--model_path", str(target["model"]), "--model_family", "tiny", "--tofu_batch_size", "2", *sets]
    start = time.perf_counter()
    evaluate_tofu.main([*common, "--save_dir", str(tmp_path / "one")])
    one_s = time.perf_counter() - start
    start = time.perf_counter()
    proc = launch_two_processes("evaluate_tofu.py", [*common, "--save_dir", str(tmp_path / "two")])
    two_s = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"TOFU evaluation, 4 sets x 5 items: 1 process {one_s:.1f} s (in-process), 2 processes {two_s:.1f} s "
          "(with start-up)")
    one = json.loads((tmp_path / "one" / "eval_log_aggregated.json").read_text())
    two = json.loads((tmp_path / "two" / "eval_log_aggregated.json").read_text())
    assert two == one
    assert len(one["eval_log_forget.json"]["generated_text"]) == 5
    assert proc.stdout.count("Model Utility") == 1  # the table is printed by one process


@pytest.mark.slow
def test_eval_tofu_after_two_process_training_equals_evaluating_the_adapter(target, tmp_path):
    """--eval_tofu under 2 processes: both evaluate their share of the trained model; the log equals
    evaluate_tofu.py's on one process with the saved adapter."""
    sets = write_tofu_sets(target, tmp_path / "sets")
    proc = launch_two_processes("forget_me_gd.py", base_args(
        target, tmp_path, "--num_epochs", "1", "--bs", "4", "--lr", "1e-3", "--eval_tofu", "--tofu_batch_size", "2",
        *sets))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "adapter").iterdir()
    evaluate_tofu.main(["--model_path", str(target["model"]), "--model_family", "tiny", "--adapter",
                        str(run / "final_lora_model"), "--tofu_batch_size", "2", *sets,
                        "--save_dir", str(tmp_path / "one")])
    trained = json.loads((run / "tofu_eval" / "eval_log_aggregated.json").read_text())
    one = json.loads((tmp_path / "one" / "eval_log_aggregated.json").read_text())
    assert trained.keys() == one.keys()
    for key in one:
        assert trained[key]["generated_text"] == one[key]["generated_text"], key
        for metric in ("avg_gt_loss", "avg_paraphrased_loss", "truth_ratio"):
            assert trained[key][metric] == pytest.approx(one[key][metric], rel=1e-6), (key, metric)


@pytest.mark.slow
def test_unlearning_evaluation_on_two_processes_equals_one_process(target, trained_adapter, tmp_path):
    """evaluate_unlearning.py (generation, MIA forward passes, GradNorm's backward passes, the adapter-off
    reference) under 2 processes: the same log as on one process."""
    common = ["--model_path", str(target["model"]), "--model_family", "tiny", "--adapter", str(trained_adapter),
              "--forget", str(target["forget"]), "--retain", str(target["retain"]), "--holdout", str(target["retain"]),
              "--batch_size", "3", "--max_new_tokens", "16"]
    evaluate_unlearning.main([*common, "--out", str(tmp_path / "one")])
    proc = launch_two_processes("evaluate_unlearning.py", [*common, "--out", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "eval_log.json").read_text())
    two = json.loads((tmp_path / "two" / "eval_log.json").read_text())
    assert two == one and len(one["forget"]) == 16


class LocalOnly(Shard):
    """A shard that keeps its own results (no other process to gather from): shows which items it computed."""

    def gather(self, local, total):
        return local


def test_each_process_computes_only_its_batches(target, tokenizer, template):
    """Process 1 of 2 with batch size 2 over 7 items: its forward passes cover items 2, 3, 6 (batches 1 and 3);
    generation batches prompts by length first, and process 1 answers exactly the prompts of batches 1 and 3 of
    that order."""
    from evals.answer_nll import qa_batches
    from evals.generation import generate_with_model
    from evals.sampling import GenerationConfig
    from utils.loading import load_for_eval

    model, tok = load_for_eval(target["model"])
    pairs = target["forget_pairs"][:7]
    questions, answers = [q for q, _ in pairs], [a for _, a in pairs]
    batches = qa_batches(model, tok, template, list(zip(questions, answers, strict=True)), 2, 256, Shard(1, 2))
    assert [list(indices) for indices, _ in batches] == [[2, 3], [6]]
    prompts = [template.prompt(q) for q in questions]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    order = sorted(range(7), key=lambda i: -lengths[i])
    generated = generate_with_model(model, tok, prompts, GenerationConfig(max_new_tokens=4, batch_size=2),
                                    shard=LocalOnly(1, 2))
    assert sorted(generated) == sorted(order[2:4] + order[6:])


@pytest.mark.parametrize("how", ["env", "json"])
def test_eval_tofu_under_zero3_stops_before_training(target, tmp_path, capsys, monkeypatch, how):
    """ZeRO-3 slices the weights across processes: --eval_tofu is refused at start (from accelerate's stage
    variable, or the stage inside a DeepSpeed JSON config), before any model loads or folder is made."""
    import forget_me_gd
    from tests.conftest import run_script

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    if how == "env":
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    else:
        config = tmp_path / "ds.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    sets = write_tofu_sets(target, tmp_path / "sets")
    code, err = run_script(forget_me_gd, base_args(target, tmp_path, "--eval_tofu", *sets), capsys)
    assert code == 2 and "--eval_tofu under DeepSpeed ZeRO-3" in err
    assert not (tmp_path / "adapter").exists()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    from trainer.launch import deepspeed_zero_stage

    assert deepspeed_zero_stage() == 2
