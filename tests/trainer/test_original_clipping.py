"""What the competition's DeepSpeed launch clipped at, established by running its loop (reduced:
original_deepspeed_loop.py) under `accelerate launch` with the original's DeepSpeed settings on CPU DeepSpeed, and
the default this project derives from it (docs/fidelity.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_the_originals_deepspeed_launch_clipped_at_one_on_a_twice_divided_gradient(tmp_path):
    """The original's accelerate yaml (ZeRO-2, accumulation 16, no gradient_clipping key; here accumulation 4 and
    1 process): accelerate fills DeepSpeed's gradient_clipping with 1.0, and the gradient DeepSpeed measures at its
    first step is the loss gradient divided by the accumulation steps twice (the loop's own division, then
    DeepSpeed's). With accelerate 1.15 that loop (no accumulate()) makes DeepSpeed step on every micro-batch, on
    the first micro-batch's gradient / accumulation^2; with the accelerate of the competition's time (<= 1.7)
    DeepSpeed stepped every accumulation window on its mean-loss gradient / accumulation. Either way 1.0 on that
    gradient is accumulation x 1.0 on the window's mean-loss gradient (accelerate <= 1.7), which is what our
    default --max_grad_norm under DeepSpeed reproduces."""
    config = yaml.safe_load((ROOT / "accelerate_config.yaml").read_text())
    del config["deepspeed_config"]["gradient_clipping"]  # the original's yaml had none
    config["deepspeed_config"]["gradient_accumulation_steps"] = 4
    config.update(num_processes=1, mixed_precision="no")
    (tmp_path / "original.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(tmp_path / "original.yaml"), "--main_process_port", str(port),
                           str(Path(__file__).with_name("original_deepspeed_loop.py"))], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    print(result)
    assert result["gradient_clipping"] == 1.0 and result["accumulation"] == 4
    if result["optimizer_steps"] == result["micro_batches"]:  # accelerate >= 1.8: a step per micro-batch
        assert result["first_step_norm"] == pytest.approx(result["micro_batch_norm"] / 16, rel=1e-4)
    else:  # accelerate <= 1.7: a step per window
        assert result["optimizer_steps"] == result["micro_batches"] // 4
        assert result["first_step_norm"] == pytest.approx(result["window_mean_norm"] / 4, rel=1e-4)


def test_default_clipping_follows_the_launch(monkeypatch):
    """--max_grad_norm unset: 0 (none) with plain python, as the original; under DeepSpeed 1.0 x accumulation (the
    original's 1.0 on its twice-divided gradient). An explicit value always wins."""
    from trainer.launch import resolve_max_grad_norm
    from trainer.recipe import build_parser

    args = build_parser("me_gd", "").parse_args(["--model_path", "m"])
    assert args.max_grad_norm is None and resolve_max_grad_norm(args, 16) == 0.0
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert resolve_max_grad_norm(args, 16) == 16.0 and resolve_max_grad_norm(args, 1) == 1.0
    args.max_grad_norm = 0.0
    assert resolve_max_grad_norm(args, 16) == 0.0
