"""Checkpoints committed by renaming: ``checkpoint-<step>`` becomes ``checkpoint-epoch-<N>`` once whole (on every
machine), rotated by ``--save_total_limit``, and found again for ``--resume_from_checkpoint latest``."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

EPOCH_CHECKPOINT_RE = re.compile(r"^checkpoint-epoch-(\d+)$")


def commit_on_every_machine(run_dir: Path, step_name: str, epoch: int, keep: int | None, process_index: int,
                            local_process_index: int, barrier: Callable[[], None]) -> None:
    """:func:`commit_checkpoint` by the main process, then (after ``barrier``) by each other machine's main process
    where the step folder is still on its disk: without a shared file system every machine holds its own."""
    if process_index == 0:
        commit_checkpoint(run_dir, step_name, epoch, keep)
    barrier()
    if process_index != 0 and local_process_index == 0 and (run_dir / step_name).is_dir():
        commit_checkpoint(run_dir, step_name, epoch, keep)
    barrier()


def commit_checkpoint(run_dir: Path, step_name: str, epoch: int, keep: int | None) -> Path:
    """Rename ``run_dir/step_name`` to ``checkpoint-epoch-<epoch>`` (replacing one of that name in one step), then
    delete the oldest ``checkpoint-epoch-*`` folders beyond the newest ``keep`` (``None`` or 0: keep all)."""
    from utils.files import replace_folder

    epoch_dir = run_dir / f"checkpoint-epoch-{epoch}"
    replace_folder(run_dir / step_name, epoch_dir)
    logger.info("saved %s", epoch_dir)
    if keep:
        found = sorted((int(m.group(1)), child) for child in run_dir.iterdir()
                       if (m := EPOCH_CHECKPOINT_RE.match(child.name)) and child.is_dir())
        for _, old in found[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("removed %s (--save_total_limit %d)", old, keep)
    return epoch_dir


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete ``checkpoint-epoch-N`` folder with the highest N in ``run_dir``, or ``None``."""
    found = []
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            match = EPOCH_CHECKPOINT_RE.match(child.name)
            if match and (child / "trainer_state.json").is_file():
                found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


class EpochCheckpointCallback(TrainerCallback):
    """Ask the Trainer for a full checkpoint at the end of every ``every`` epochs."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = round(state.epoch or 0)
        # --max_steps ends the loop mid-epoch and the Trainer still calls on_epoch_end: no checkpoint named after
        # an epoch that did not end (nor one of the last step, which the final save covers)
        whole = epoch >= 1 and abs((state.epoch or 0) - epoch) < 1e-6
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            return control
        if whole and self.every > 0 and epoch % self.every == 0 and epoch < args.num_train_epochs:
            control.should_save = True
        return control
