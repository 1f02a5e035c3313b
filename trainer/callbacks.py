"""The training run's callbacks beyond checkpoints: the dataset's epoch, a quiet progress bar, the JSONL log."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class DatasetEpochCallback(TrainerCallback):
    """Tell the dataset which epoch starts (its random retain draw depends on it); the Trainer's own
    ``set_epoch`` reaches the sampler, not a map-style dataset."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(round(state.epoch or 0)))
        return control


class QuietProgressCallback(ProgressCallback):
    """The training bar with the latest losses as its postfix, instead of a printed dict of strings per log
    (every step at the default --logging_steps 1); the full rows are in train_log.jsonl. The end of training is one
    line (steps, epochs, time, mean loss), not the Trainer's dict of strings."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step  # 0, or the checkpoint's step on resume (the runtime is this run's)
        return super().on_train_begin(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "train_runtime" in logs:
            self.training_bar.write(summary_line(state.global_step - getattr(self, "first_step", 0), state.epoch,
                                                 logs))
            return
        shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "forget_loss", "retain_loss", "retain_weight")
                 and isinstance(v, int | float)}
        if shown:
            self.training_bar.set_postfix(shown, refresh=False)


class JsonlLogCallback(TrainerCallback):
    """Append every logged step (loss, forget_loss, retain_loss, learning_rate, epoch, ...) to a JSONL file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, int | float)}}
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        return control


def summary_line(steps: int, epoch: float | None, logs: dict) -> str:
    """``trained 40 steps (5 epochs) in 44.7 s (0.89 steps/s), mean loss 1.234`` from the Trainer's final log."""
    runtime = float(logs.get("train_runtime", 0.0))
    took = f"{runtime:.1f} s" if runtime < 120 else f"{runtime / 60:.1f} min"
    rate = f" ({steps / runtime:.2f} steps/s)" if runtime > 0 else ""
    loss = logs.get("train_loss")
    return (f"trained {steps} step{'s' if steps != 1 else ''} ({epoch or 0:.3g} epochs) in {took}{rate}"
            + (f", mean loss {loss:.4g}" if isinstance(loss, int | float) else ""))
