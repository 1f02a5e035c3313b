"""DeepSpeed for real, on CPU: ``accelerate launch --config_file accelerate_config.yaml`` (the shipped file, with
only what this machine lacks overridden on the launch line: 2 processes, no bf16) trains under ZeRO-2 and
ZeRO-3 with the scripts' default arguments and writes the adapter a plain 1-process run with the same global
batch writes; also with ``--lora_r 0`` and a reference loss (NPO+KL).

DeepSpeed 0.19.8 runs on CPU with ``DS_ACCELERATOR=cpu`` (gloo). Two arguments differ from the defaults, both
because the comparison needs them: LoRA dropout 0 (its masks are per-process random draws) and lr 3e-3 (at
3e-5 five steps move the adapter less than the comparison's tolerance).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forget_me_gd
from tests.conftest import base_args, free_port

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "accelerate_config.yaml"
LOSS_TOL = 1e-5  # relative, per logged value (as tests/trainer/test_world_size.py)
LOSS_ATOL = 1e-8  # KL to the reference starts at 0: its first values are float noise
WEIGHT_TOL = 1e-4  # absolute, per weight

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed is not installed (requirements.txt installs it)")

# What this CPU machine cannot take from the shipped file; everything else (DeepSpeed, ZeRO-2, its accumulation
# of 16, its gradient clipping) comes from accelerate_config.yaml itself.
CPU_OVERRIDES = ("--num_processes", "2", "--mixed_precision", "no")
ZERO3 = ("--zero_stage", "3", "--zero3_init_flag", "true", "--zero3_save_16bit_model", "true")


def launch_deepspeed(script: str, argv: list[str], *launch: str) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file accelerate_config.yaml <CPU overrides> <launch> script argv`` on a free
    port, DeepSpeed on its CPU accelerator."""
    port = free_port()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(SHIPPED), *CPU_OVERRIDES,
           *launch, "--main_process_port", str(port), script, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


def only_run(root: Path) -> Path:
    (run,) = (root / "adapter").iterdir()
    return run


def outputs(run: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Logged step rows and the final folder's tensors."""
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    final = run / ("final_model" if (run / "final_model").is_dir() else "final_lora_model")
    tensors = {}
    for file in sorted(final.glob("*.safetensors")):
        tensors.update(load_file(file))
    return [r for r in rows if "loss" in r], tensors


def assert_same_training(run: Path, plain: Path, moved: str) -> None:
    """The same per-step losses and final weights as the plain run, and the weights named ``moved`` really moved."""
    rows, weights = outputs(run)
    ref_rows, ref_weights = outputs(plain)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] and rows
    for row, ref in zip(rows, ref_rows, strict=True):
        for key in ("loss", "forget_loss", "retain_loss"):
            assert row[key] == pytest.approx(ref[key], rel=LOSS_TOL, abs=LOSS_ATOL), (row["step"], key)
    assert weights.keys() == ref_weights.keys() and weights
    for key, value in weights.items():
        assert value.numel() > 0, key  # ZeRO-3 without gathering saves empty tensors
        assert torch.allclose(value.float(), ref_weights[key].float(), rtol=0, atol=WEIGHT_TOL), key
    assert max(v.abs().max().item() for k, v in ref_weights.items() if moved in k) > 50 * WEIGHT_TOL


@pytest.fixture(scope="module")
def plain_runs(target, tmp_path_factory) -> dict[str, Path]:
    """Plain 1-process runs with the global batch of the DeepSpeed launches: 16 items a step (the shipped
    accumulation of 16 over 2 processes meets the 8 items each process has an epoch: one step an epoch)."""
    root = tmp_path_factory.mktemp("plain")
    runs = {}
    for name, extra in PLAIN.items():  # the DeepSpeed launches clip at 1.0 x 16 by default (docs/fidelity.md)
        forget_me_gd.main(base_args(target, root / name, *COMMON, *extra, "--gradient_accumulation_steps", "16",
                                    "--max_grad_norm", "16"))
        runs[name] = only_run(root / name)
    return runs


COMMON = ("--lora_dropout", "0", "--lr", "3e-3")
PLAIN = {"lora": (), "full": ("--lora_r", "0"), "npo_kl": ("--loss_type", "NPO+KL")}


# NPO+KL's reference is the LoRA model with its adapter disabled: under ZeRO-2 that is lora-2's path with whole
# weights, so only ZeRO-3 (partitioned weights gathered for the reference pass) is launched for it (CI time).
GRID = [("lora", 2), ("lora", 3), ("full", 2), ("full", 3), ("npo_kl", 3)]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "stage"), GRID, ids=[f"{k}-{s}" for k, s in GRID])
def test_deepspeed_trains_as_one_process_with_the_same_global_batch(target, tmp_path, plain_runs, stage, kind):
    """ZeRO-2 and ZeRO-3, 2 processes: same per-step losses and the same final weights (within the world-size
    tests' tolerance) as one plain process with the same global batch; the saved folder has every weight (ZeRO-3
    gathers them) and reloads. ZeRO-3 partitions the model while it loads, and the fused head gathers its
    weight."""
    launch = ZERO3 if stage == 3 else ()
    proc = launch_deepspeed("forget_me_gd.py", base_args(target, tmp_path, *COMMON, *PLAIN[kind]), *launch)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if stage == 3:  # zero.Init: the run's TrainingArguments existed before from_pretrained
        assert "ZeRO-3: weights partitioned while loading" in proc.stderr, proc.stderr[-3000:]
    run = only_run(tmp_path)
    recorded = json.loads((run / "run_args.json").read_text())
    assert recorded["world_size"] == 2 and recorded["gradient_accumulation_steps"] == 16
    assert_same_training(run, plain_runs[kind], "lora_B" if kind != "full" else "self_attn")
    if kind != "full":
        from utils.loading import load_model

        model = load_model(target["model"], run / "final_lora_model", dtype="float32", device="cpu")
        ids = torch.tensor([[1, 2, 3]])
        with torch.no_grad(), model.disable_adapter():
            base = model(ids).logits
        assert not torch.allclose(model(ids).logits, base)  # the reloaded adapter changes the model


def test_headline_config_disagreeing_with_the_arguments_is_one_error_line(target, tmp_path):
    """accelerate_config.yaml used to say gradient_clipping: 1.0 while --max_grad_norm defaulted to 0 (now: under
    DeepSpeed, 1.0 x the accumulation steps): transformers stopped inside train(), after the model loaded, with a
    traceback. Now the DeepSpeed values are compared with
    the arguments before any model loads: one error line, exit code 2."""
    proc = launch_deepspeed("forget_me_gd.py", base_args(target, tmp_path), "--gradient_clipping", "1.0")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "gradient_clipping 1.0 but --max_grad_norm 16.0" in lines[0] and "auto" in lines[0]
    ours = proc.stderr.split("failed (exitcode")[0]  # what the processes wrote; the launcher's report follows
    assert "Traceback" not in ours and "error:" in ours
    assert not (tmp_path / "adapter").exists() or not any((tmp_path / "adapter").rglob("final_lora_model"))


def test_zero3_without_gathering_the_weights_stops_before_training(target, tmp_path):
    """ZeRO-3 without zero3_save_16bit_model would save an empty adapter into a folder that looks finished."""
    proc = launch_deepspeed("forget_me_gd.py", base_args(target, tmp_path), "--zero_stage", "3",
                            "--zero3_init_flag", "true", "--zero3_save_16bit_model", "false")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "zero3_save_16bit_model" in lines[0], proc.stderr[-3000:]
