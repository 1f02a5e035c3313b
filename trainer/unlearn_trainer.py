"""The one Trainer subclass: forward passes over named batch parts, then ``forget_coeff * F + retain_coeff * R``."""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from dataset.data_module import IGNORE_INDEX
from trainer.losses import LossTerm, PartOutput

logger = logging.getLogger(__name__)

EPOCH_CHECKPOINT_RE = re.compile(r"^checkpoint-epoch-(\d+)$")


class UnlearnTrainingArguments(TrainingArguments):
    """``TrainingArguments`` whose warm-up ratio rounds down, as the original scripts' did
    (``int(warmup_ratio * total_steps)``; transformers rounds up: 30 steps at 0.05 give 1 step, not 2)."""

    def get_warmup_steps(self, num_training_steps: int) -> int:
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return int(num_training_steps * self.warmup_steps)


class UnlearnTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is an unlearning objective from ``trainer.losses.LOSSES``.

    Batches are dicts of named parts (``forget``, ``retain``, ``forget_idk``, ``retain_idk``), each a dict
    of ``input_ids``, ``attention_mask`` and ``labels``. Reference logits (NPO, DPO, KL) come from the same
    model with its LoRA adapter disabled, so no second copy of the model is held in memory.
    """

    # compute_loss returns a per-batch mean; the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args,
        forget_term: LossTerm,
        retain_term: LossTerm | None,
        forget_coeff: float = 1.0,
        retain_coeff: float = 1.0,
        beta: float = 0.1,
        skip_unlabelled_logits: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.forget_term = forget_term
        self.retain_term = retain_term
        self.forget_coeff = forget_coeff
        self.retain_coeff = retain_coeff
        self.beta = beta
        terms = [t for t in (forget_term, retain_term) if t is not None]
        self.parts = tuple(dict.fromkeys(p for t in terms for p in t.parts))
        self.ref_parts = frozenset(p for t in terms if t.needs_ref for p in t.parts)
        self._component_sums: dict[str, float] = {}
        self._component_steps = 0
        unwrapped = self.accelerator.unwrap_model(self.model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        # models without `logits_to_keep` (older or custom architectures) compute every position
        self.skip_unlabelled_logits = skip_unlabelled_logits and "logits_to_keep" in inspect.signature(
            base.forward).parameters

    # ------------------------------------------------------------------ data order

    def _get_train_sampler(self, train_dataset=None):
        """``--group_by_length``: batches of similar total length (less padding), from the dataset's own
        lengths (items are dicts of parts, which the stock sampler cannot measure)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        dataset=dataset, lengths=dataset.lengths())
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------ loss

    def _kept_positions(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Positions whose logits some loss reads, and the labels re-aligned to them.

        Position p is needed when some row has a label at p + 1. The output head (``hidden x vocab`` per
        position, the largest matmul of a small model) then runs only there: masked questions and padding
        cost nothing. The last position is kept as the shift's spare, so the kept logits and the
        re-aligned labels keep the losses' convention (logit j predicts label j + 1).
        """
        if not self.skip_unlabelled_logits:
            return None, labels
        needed = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # (K,)
        length = labels.size(1)
        if needed.numel() + 1 >= length:
            return None, labels
        keep = torch.cat([needed, needed.new_tensor([length - 1])])
        spare = labels.new_full((labels.size(0), 1), IGNORE_INDEX)
        return keep, torch.cat([spare, labels[:, needed + 1]], dim=1)

    @staticmethod
    def _forward(model, part: dict[str, torch.Tensor], keep: torch.Tensor | None) -> torch.Tensor:
        kwargs = {} if keep is None else {"logits_to_keep": keep}
        return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], **kwargs).logits

    def _reference_logits(self, model, part: dict[str, torch.Tensor], keep: torch.Tensor | None) -> torch.Tensor:
        """Logits of the base model: the same weights with the LoRA adapter switched off."""
        peft_model = self.accelerator.unwrap_model(model)
        with torch.no_grad(), peft_model.disable_adapter():
            return self._forward(peft_model, part, keep)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = {}
        for name in self.parts:
            part = inputs[name]
            keep, labels = self._kept_positions(part["labels"])
            ref = self._reference_logits(model, part, keep) if name in self.ref_parts else None
            outputs[name] = PartOutput(self._forward(model, part, keep), labels, ref)
        forget = self.forget_term.compute(outputs, self.beta)
        loss = self.forget_coeff * forget
        components = {"forget_loss": forget.detach()}
        if self.retain_term is not None:
            retain = self.retain_term.compute(outputs, self.beta)
            loss = loss + self.retain_coeff * retain
            components["retain_loss"] = retain.detach()
        self._record(components)
        return (loss, outputs) if return_outputs else loss

    def _record(self, components: dict[str, torch.Tensor]) -> None:
        if not self.model.training:
            return
        for key, value in components.items():
            self._component_sums[key] = self._component_sums.get(key, 0.0) + float(value)
        self._component_steps += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean forget and retain losses since the last log (averaged over processes)."""
        if "loss" in logs and self._component_steps:
            for key, total in self._component_sums.items():
                value = torch.tensor(total / self._component_steps, device=self.args.device)
                logs[key] = float(self.accelerator.reduce(value, reduction="mean"))
            self._component_sums, self._component_steps = {}, 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model, trial) -> None:
        """Save as usual, then rename ``checkpoint-<step>`` to ``checkpoint-epoch-<N>``.

        The rename is the checkpoint's commit: a run killed mid-save leaves no ``checkpoint-epoch-*``
        folder that ``--resume_from_checkpoint latest`` could pick up half-written.
        """
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            step_dir = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            epoch_dir = Path(self.args.output_dir) / f"checkpoint-epoch-{round(self.state.epoch or 0)}"
            if epoch_dir.exists():
                shutil.rmtree(epoch_dir)
            os.replace(step_dir, epoch_dir)
            logger.info("saved %s", epoch_dir)
        self.accelerator.wait_for_everyone()


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
        if self.every > 0 and epoch % self.every == 0 and epoch < args.num_train_epochs:
            control.should_save = True
        return control


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
