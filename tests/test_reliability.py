"""Bad input fails fast with one clear message and no output; a killed run resumes to the same adapter."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evaluate
import forget_idk_ap
import forget_me_gd
import merge
import trainer.recipe
from tests.conftest import run_script

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}], "name_key": "p_1"}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# each case: (name, how to break the inputs, expected words in the message)
BAD_TRAINING_INPUTS = [
    ("missing file", lambda t, p: {"--forget_data_path": str(p / "nope.jsonl")}, ["nope.jsonl", "file not found"]),
    ("malformed JSON", lambda t, p: {"--forget_data_path": str(write(p / "f.jsonl", json.dumps(GOOD) + "\n{oops\n"))},
     ["f.jsonl, line 2", "malformed JSON"]),
    ("no conversations", lambda t, p: {"--retain_data_path": str(write(p / "r.jsonl", '{"text": "x"}\n'))},
     ["r.jsonl, line 1", "'conversations'"]),
    ("one turn", lambda t, p: {"--forget_data_path": str(write(p / "f.jsonl", json.dumps(
        {"conversations": [{"from": "human", "value": "Q"}]}) + "\n"))}, ["line 1", "at least two turns"]),
    ("non-string value", lambda t, p: {"--forget_data_path": str(write(p / "f.jsonl", json.dumps(
        {"conversations": [{"value": "Q"}, {"value": ["A"]}]}) + "\n"))},
     ["line 1", "conversations[1].value", "string"]),
    ("empty forget set", lambda t, p: {"--forget_data_path": str(write(p / "f.jsonl", "\n"))}, ["f.jsonl", "empty"]),
    ("empty retain set", lambda t, p: {"--retain_data_path": str(write(p / "r.jsonl", ""))}, ["r.jsonl", "empty"]),
    ("all questions too long", lambda t, p: {"--max_length": "8"}, ["--max_length 8", "raise --max_length"]),
    ("unknown family", lambda t, p: {"--model_family": "gpt-9"}, ["unknown model family 'gpt-9'", "qwen2.5-8b"]),
    ("unknown output name", lambda t, p: {"--output_dir": str(p / "${nmae}")}, ["--output_dir", "${nmae}"]),
    ("not a model folder", lambda t, p: {"--model_path": str(p)}, ["not a model folder", "config.json"]),
    ("resume from a non-checkpoint", lambda t, p: {"--resume_from_checkpoint": str(p)},
     ["--resume_from_checkpoint", "not a training checkpoint"]),
    ("warm-up ratio out of range", lambda t, p: {"--warmup_ratio": "1.5"}, ["--warmup_ratio", "[0, 1)"]),
    ("accelerate config that does not exist", lambda t, p: {"--config_file": "acelerate_config.yaml"},
     ["--config_file acelerate_config.yaml", "file not found", "accelerate launch --config_file FILE"]),
    ("max_steps 0", lambda t, p: {"--max_steps": "0"}, ["--max_steps", "at least 1"]),
    ("unfinished run folder", lambda t, p: {"--output_dir": str(write(
        p / "run" / "checkpoint-epoch-2" / "trainer_state.json", "{}").parents[1])},
     ["holds an unfinished run", "checkpoint-epoch-2", "--resume_from_checkpoint latest", "--overwrite"]),
]


def training_argv(target: dict, tmp_path: Path, overrides: dict[str, str]) -> list[str]:
    args = {"--model_path": str(target["model"]), "--model_family": "tiny",
            "--forget_data_path": str(target["forget"]), "--retain_data_path": str(target["retain"]),
            "--idk_data_path": str(target["idk"]), "--save_root": str(tmp_path / "adapter"), "--num_epochs": "1"}
    args.update(overrides)
    return [x for pair in args.items() for x in pair]


@pytest.mark.parametrize(("name", "break_it", "words"), BAD_TRAINING_INPUTS, ids=[c[0] for c in BAD_TRAINING_INPUTS])
def test_training_bad_input(target, tmp_path, capsys, monkeypatch, name, break_it, words):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr(trainer.recipe, "build_model", no_model)
    code, err = run_script(forget_me_gd, training_argv(target, tmp_path, break_it(target, tmp_path)), capsys)
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    for word in words:
        assert word in err
    assert not (tmp_path / "adapter").exists()


def test_idk_file_without_lines(target, tmp_path, capsys):
    argv = training_argv(target, tmp_path, {"--idk_data_path": str(write(tmp_path / "idk.txt", "\n\n"))})
    code, err = run_script(forget_idk_ap, argv, capsys)
    assert code == 2 and "idk.txt" in err and "no refusal lines" in err
    assert not (tmp_path / "adapter").exists()


def test_unknown_loss_type_fails_at_parse_time(target, tmp_path, capsys):
    code, err = run_script(forget_me_gd, training_argv(target, tmp_path, {"--loss_type": "ME+GDX"}), capsys)
    assert code == 2 and "invalid choice: 'ME+GDX'" in err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err  # one line, not 35 lines of usage first
    code, err = run_script(forget_me_gd, training_argv(target, tmp_path, {"--mask": "nope"}), capsys)
    assert code == 2 and "--mask" in err and len(err.strip().splitlines()) == 1


def test_progress_bar_shows_losses_instead_of_printing_a_dict_per_step(target, tmp_path, capsys):
    forget_me_gd.main(training_argv(target, tmp_path, {"--num_epochs": "1", "--bs": "4", "--logging_steps": "1"}))
    out = capsys.readouterr()
    assert "{'loss'" not in out.out + out.err and "forget_loss=" in out.err
    assert "train_runtime" not in out.out + out.err  # the end is one line, not the Trainer's dict of strings
    assert re.search(r"trained 4 steps \(1 epochs\) in [\d.]+ s \([\d.]+ steps/s\), mean loss -?[\d.]+",
                     out.out + out.err)


def test_the_seed_command_line_says_what_it_does_not_read(target, tmp_path, capsys, caplog, monkeypatch):
    """The seed's `--config_file accelerate_config.yaml` after the script name and no data paths: one warning each
    (accelerate did not read the file; the repository's demo data is what trains); --max_steps stops the run;
    an --overwrite run drops the earlier run's checkpoints."""
    monkeypatch.chdir(ROOT)  # the default data paths are relative to the repository, as the original's
    argv = ["--model_path", str(target["model"]), "--model_family", "tiny", "--config_file",
            "accelerate_config.yaml", "--max_steps", "2", "--output_dir", str(tmp_path / "run"), "--max_length", "64"]
    final = forget_me_gd.main(argv)
    log = [json.loads(x) for x in (final.parent / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == 2  # 2 of the 96-item epoch's steps
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # no epoch ended: no checkpoint named after one
    assert "--config_file accelerate_config.yaml after the script name is not read" in caplog.text
    assert "no --forget_data_path / --retain_data_path given: training on the repository's demo data (96 forget" \
        in caplog.text
    caplog.clear()
    (tmp_path / "run" / "checkpoint-epoch-9").mkdir()
    forget_me_gd.main([*argv, "--overwrite", "--forget_data_path", str(target["forget"]), "--retain_data_path",
                       str(target["retain"])])
    assert "demo data" not in caplog.text and not (tmp_path / "run" / "checkpoint-epoch-9").exists()


@pytest.mark.slow
def test_ctrl_c_leaves_one_line_and_the_default_run_resumes(target, tmp_path):
    """With the default --save_steps (1 epoch) a checkpoint exists after the first epoch; SIGINT then ends the
    run with exit code 130 and one line saying how to resume, no traceback; the same command with
    --resume_from_checkpoint latest finishes it."""
    forget = write(tmp_path / "forget.jsonl", Path(target["forget"]).read_text() * 6)
    argv = training_argv(target, tmp_path, {"--forget_data_path": str(forget), "--num_epochs": "3", "--bs": "1"})
    run = tmp_path / "run"
    cmd = [sys.executable, "forget_me_gd.py", *argv, "--output_dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a shell starts background jobs with SIGINT ignored (and Python then keeps it ignored): restore the default,
    # as a terminal's foreground process has it
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (run / "checkpoint-epoch-1").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130, err[-2000:]
    said = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1 and said[0].startswith("interrupted: the last complete checkpoint is")
    assert "--resume_from_checkpoint latest" in said[0] and "Traceback" not in err
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)  # forgot the resume flag
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr[-2000:]
    assert "unfinished run (last checkpoint checkpoint-epoch-" in again.stderr
    resumed = subprocess.run([*cmd, "--resume_from_checkpoint", "latest"], cwd=ROOT, env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "final_lora_model" / "adapter_model.safetensors").is_file()


def test_some_questions_too_long_are_skipped_and_counted(target, tmp_path, caplog):
    long_item = {"conversations": [{"from": "human", "value": "why " * 300}, {"from": "gpt", "value": "x"}]}
    forget = write(tmp_path / "f.jsonl", Path(target["forget"]).read_text() + json.dumps(long_item) + "\n")
    final = forget_me_gd.main(training_argv(target, tmp_path, {"--forget_data_path": str(forget),
                                                               "--max_length": "128"}))
    assert "1 of 17 forget items dropped" in caplog.text
    assert json.loads((final.parent / "run_args.json").read_text())["train_items"] == 16


def test_finished_run_is_not_overwritten(target, tmp_path, capsys):
    argv = training_argv(target, tmp_path, {"--output_dir": str(tmp_path / "run")})
    final = forget_me_gd.main(argv)
    before = (final / "adapter_model.safetensors").read_bytes()
    code, err = run_script(forget_me_gd, argv, capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (final / "adapter_model.safetensors").read_bytes() == before


def test_merge_base_that_is_not_a_model(trained_adapter, tmp_path, capsys):
    code, err = run_script(merge, ["--base_model", str(tmp_path), "--adapter", str(trained_adapter),
                                   "--output", str(tmp_path / "m")], capsys)
    assert code == 2 and "--base_model" in err and "not a model folder" in err
    assert not (tmp_path / "m").exists()


def test_evaluate_malformed_predictions(tmp_path, capsys):
    write(tmp_path / "v.jsonl", json.dumps(GOOD) + "\n")
    write(tmp_path / "p.jsonl", '{"answer": "A."}\n')
    code, err = run_script(evaluate, ["--test_data", str(tmp_path / "v.jsonl"), "--user_out_path",
                                      str(tmp_path / "p.jsonl"), "--out_path", str(tmp_path / "s.jsonl")], capsys)
    assert code == 2 and "p.jsonl, line 1" in err and "'text'" in err
    assert not (tmp_path / "s.jsonl").exists()


def test_scripts_keep_existing_outputs_unless_overwrite(trained_adapter, target, tmp_path, capsys):
    """One rule for every script: an existing output is kept unless --overwrite (predict_demo.py replaced it
    silently by default, evaluate.py always)."""
    import predict_demo

    write(tmp_path / "s.jsonl", "earlier scores\n")
    write(tmp_path / "a.jsonl", "earlier answers\n")
    write(tmp_path / "p.jsonl", '{"text": "an answer"}\n' * 16)  # line-aligned with the 16 forget items
    code, err = run_script(evaluate, ["--test_data", str(target["forget"]), "--user_out_path",
                                      str(tmp_path / "p.jsonl"), "--out_path", str(tmp_path / "s.jsonl")], capsys)
    assert code == 2 and "--out_path" in err and "--overwrite" in err
    code, err = run_script(predict_demo, ["--model_path", str(target["model"]), "--data_path", str(target["forget"]),
                                          "--output_path", str(tmp_path / "a.jsonl")], capsys)
    assert code == 2 and "--output_path" in err and "--overwrite" in err
    assert (tmp_path / "s.jsonl").read_text() == "earlier scores\n"
    assert (tmp_path / "a.jsonl").read_text() == "earlier answers\n"


# --------------------------------------------------------------------------- kill and resume


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(target, tmp_path):
    """A real SIGKILL after the first checkpoint, then --resume_from_checkpoint latest: same number of
    optimizer steps and the same final adapter as a run never interrupted (same seed)."""
    from safetensors.torch import load_file

    forget = write(tmp_path / "forget.jsonl", Path(target["forget"]).read_text() * 6)  # 96 items: ~2 s an epoch
    common = training_argv(target, tmp_path, {"--forget_data_path": str(forget), "--num_epochs": "3",
                                              "--bs": "1", "--save_steps": "1", "--lr": "1e-3"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    reference = forget_me_gd.main([*common, "--output_dir", str(tmp_path / "straight")])

    run = tmp_path / "killed"
    cmd = [sys.executable, "forget_me_gd.py", *common, "--output_dir", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoint-epoch-1").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (run / "checkpoint-epoch-1").is_dir() and not (run / "final_lora_model").exists()

    resumed = subprocess.run([*cmd, "--resume_from_checkpoint", "latest"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((run / "checkpoint-epoch-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 * 96
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert max(steps) == 3 * 96 and len(steps) == len(set(steps))  # every step logged once, none twice

    a = load_file(reference / "adapter_model.safetensors")
    b = load_file(run / "final_lora_model" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_report_to_a_logger_that_is_not_installed(target, tmp_path, capsys):
    code, err = run_script(forget_me_gd, training_argv(target, tmp_path, {"--report_to": "swanlab"}), capsys)
    assert code == 2 and "swanlab" in err and "not installed" in err
    assert not (tmp_path / "adapter").exists()


def test_a_family_that_does_not_fit_the_tokenizer_is_warned_about(target, caplog):
    """Llama-3's or Gemma's tags on the tiny (ChatML) model: its tokenizer has no <|eot_id|>, no <start_of_turn>;
    the fitting family is quiet."""
    from trainer import recipe

    for family, expect in (("llama3-8b", True), ("gemma3", True), ("tiny", False)):
        caplog.clear()
        args = recipe.build_parser("me_gd", "").parse_args(["--model_path", str(target["model"]),
                                                            "--model_family", family])
        recipe.load_tokenizer(args, recipe.load_chat_template(family))
        warned = [r.getMessage() for r in caplog.records if "do not fit this model" in r.getMessage()]
        assert bool(warned) == expect, family
        if expect:
            assert ("<|eot_id|>" if family == "llama3-8b" else "<start_of_turn>") in warned[0] and "tiny" in warned[0]
