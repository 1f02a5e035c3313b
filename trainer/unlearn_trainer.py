"""The one Trainer subclass: forward passes over named batch parts, then ``forget_coeff * F + retain_coeff * R``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from evals.logprobs import HeadInput, accepts_logits_to_keep, fusable_head, head_input_taken, kept_positions
from trainer.losses import LossParams, LossTerm, PartOutput, dual_step, steering_vector

logger = logging.getLogger(__name__)

EPOCH_CHECKPOINT_RE = re.compile(r"^checkpoint-epoch-(\d+)$")
DUAL_STATE_FILE = "dual_state.json"
# --loss_reduction: a global mean over the optimizer step (invariant to how its items are split), or the
# original's mean per micro-batch, averaged over micro-batches and processes
LOSS_REDUCTIONS = ("global", "micro_batch")


@dataclasses.dataclass
class StepUnits:
    """What one optimizer step's micro-batches share: each term's unit count over the whole step (all
    micro-batches of all processes; ``None`` under ``--loss_reduction micro_batch``) and in each local
    micro-batch, the number of local micro-batches, and running sums the step completes with (micro-batches
    done, weighted retain loss)."""

    totals: dict[str, float] | None
    micro_batches: int
    local: list[dict[str, float]] = dataclasses.field(default_factory=list)
    done: int = 0
    retain: float = 0.0


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (plain, PEFT-wrapped or DDP-unwrapped): ``model.layers`` of its body."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", base)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(base).__name__} (expected .model.layers)")
    return layers


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length grouping with its shuffle drawn from ``seed + epoch`` (accelerate calls ``set_epoch``),
    not from the global random state, which processes consume differently (e.g. dropout masks)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class UnlearnTrainingArguments(TrainingArguments):
    """``TrainingArguments`` whose warm-up ratio rounds down, as the original scripts' did
    (``int(warmup_ratio * total_steps)``; transformers rounds up: 30 steps at 0.05 give 1 step, not 2), and that
    never trains one process on several GPUs (``nn.DataParallel``)."""

    def get_warmup_steps(self, num_training_steps: int) -> int:
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return int(num_training_steps * self.warmup_steps)

    @property
    def n_gpu(self) -> int:
        """One device per process. Outside a distributed launch transformers counts every visible GPU and wraps
        the model in ``nn.DataParallel``, which splits the batch dict's tensors across replicas (the
        ``logits_to_keep`` index among them) while the head and layer hooks see replica 0 only: a shape error or
        silently misaligned logits. Several GPUs are for ``accelerate launch``."""
        count = TrainingArguments.n_gpu.fget(self)
        if count > 1:
            if not getattr(self, "_told_one_gpu", False):
                logger.warning("%d GPUs visible but not launched as several processes: training on one; use "
                               "accelerate launch (e.g. --config_file accelerate_config.yaml) for all of them", count)
                self._told_one_gpu = True
            return 1
        return count


class UnlearnTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is an unlearning objective from ``trainer.losses.LOSSES``.

    Batches are dicts of named parts (``forget``, ``retain``, ``forget_idk``, ``retain_idk``), each a dict
    of ``input_ids``, ``attention_mask`` and ``labels``. Reference outputs (NPO, DPO, KL, UNDIAL, RMU) come
    from the same model with its LoRA adapter disabled, so no second copy of the model is held in memory;
    only full fine-tuning (``ref_model``) holds a frozen copy. Hidden states (RMU) are read by a forward hook
    on decoder layer ``hidden_layer``, registered only for the parts whose terms ask for them.
    """

    # compute_loss weighs each micro-batch by its share of the step (see _weights): the Trainer must not
    # divide by the accumulation steps again
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args,
        forget_term: LossTerm,
        retain_term: LossTerm | None,
        forget_coeff: float = 1.0,
        retain_coeff: float = 1.0,
        params: LossParams | None = None,
        ref_model: torch.nn.Module | None = None,
        hidden_layer: int | None = None,
        steering_coeff: float = 6.5,
        dual_epsilon: float | None = None,
        dual_step_size: float = 1.0,
        skip_unlabelled_logits: bool = True,
        loss_reduction: str = "global",
        fused_head: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, not {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.forget_term = forget_term
        self.retain_term = retain_term
        self.forget_coeff = forget_coeff
        self.retain_coeff = retain_coeff
        self.params = params if params is not None else LossParams()
        self.terms = {key: t for key, t in (("forget", forget_term), ("retain", retain_term)) if t is not None}
        terms = list(self.terms.values())
        self.parts = tuple(dict.fromkeys(p for t in terms for p in t.parts))
        self.ref_parts = frozenset(p for t in terms if t.needs_ref for p in t.parts)
        self.hidden_parts = frozenset(p for t in terms if t.needs_hidden for p in t.parts)
        self.logit_parts = frozenset(p for t in terms if t.needs_logits for p in t.parts)
        self.every_position_parts = frozenset(p for t in terms if t.every_position is not None
                                              and t.every_position(self.params) for p in t.parts)
        # parts every reading term of which needs only per-token NLL / ME: no logits tensor is built for them
        self.fused_parts = frozenset(p for p in self.logit_parts if all(t.fusable for t in terms if p in t.parts)) \
            if fused_head else frozenset()
        self._component_sums: dict[str, float] = {}
        self._component_steps = 0
        unwrapped = self.accelerator.unwrap_model(self.model)
        # models without `logits_to_keep` (older or custom architectures) compute every position
        self.skip_unlabelled_logits = skip_unlabelled_logits and accepts_logits_to_keep(unwrapped)
        # the reference: a frozen copy when every weight trains (made only when a term needs it), else the
        # same weights with the LoRA adapter switched off
        self.ref_model = ref_model.to(self.args.device).eval().requires_grad_(False) if ref_model is not None \
            else None
        self._head = fusable_head(unwrapped) if self.fused_parts else None
        self._ref_head = (fusable_head(self.ref_model) if self.ref_model is not None else self._head) \
            if self.fused_parts else None
        self.steering_coeff = steering_coeff
        self._layer = decoder_layers(unwrapped)[hidden_layer] if self.hidden_parts else None
        self._ref_layer = decoder_layers(self.ref_model)[hidden_layer] \
            if self.hidden_parts and self.ref_model is not None else self._layer
        # PDU: the retain weight is a dual variable, starting at the retain coefficient
        self.dual_weight = retain_coeff if retain_term is not None and retain_term.dual else None
        self.dual_epsilon = dual_epsilon
        self.dual_step_size = dual_step_size

    # ------------------------------------------------------------------ data order

    def _get_train_sampler(self, train_dataset=None):
        """``--group_by_length``: optimizer steps of similar total length (less padding), from the dataset's own
        lengths (items are dicts of parts, which the stock sampler cannot measure). Grouped by the global batch
        and drawn from (seed, epoch) alone, the order is the same on 1 or N processes."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            step = self.args.per_device_train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
            return SeededLengthGroupedSampler(step, dataset.lengths(), self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------ a step's share of each micro-batch

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> StepUnits:
        """Called by the Trainer with all micro-batches of an optimizer step before any forward pass: count each
        term's units (answer tokens or rows, from the labels alone) over the step, summed over processes."""
        if self.loss_reduction != "global" or not batch_samples:
            return StepUnits(None, len(batch_samples))
        local = [{key: float(term.units({p: batch[p]["labels"] for p in term.parts}, self.params))
                  for key, term in self.terms.items()} for batch in batch_samples]
        totals = torch.tensor([[units[key] for key in self.terms] for units in local], dtype=torch.float64).sum(0)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals.to(device), reduction="sum").cpu()
        return StepUnits(dict(zip(self.terms, totals.tolist(), strict=True)), len(batch_samples), local)

    def _weights(self, step: StepUnits, processes: int) -> dict[str, float]:
        """Each term's weight for the step's next micro-batch so that, summed over the step's micro-batches and
        processes, the step's loss is the term's global mean: ``n / N`` (this micro-batch's units, counted with
        the step's, over the step's), or under ``micro_batch`` ``1 / (micro-batches x processes)``: the mean of
        the micro-batch means."""
        if step.totals is None:
            return {key: 1.0 / (step.micro_batches * processes) for key in self.terms}
        units = step.local[step.done]
        return {key: units[key] / total if total > 0 else 0.0 for key, total in step.totals.items()}

    # ------------------------------------------------------------------ loss

    def _kept_positions(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Positions whose logits some loss reads, and the labels re-aligned to them
        (:func:`evals.logprobs.kept_positions`); every position for a model without ``logits_to_keep``."""
        if not self.skip_unlabelled_logits:
            return None, labels
        return kept_positions(labels)

    def _run(self, model, part: dict[str, torch.Tensor], keep, layer: torch.nn.Module | None,
             head: torch.nn.Linear | None = None) -> tuple[torch.Tensor | HeadInput, torch.Tensor | None]:
        """Logits (at ``keep``) and, given a layer, that layer's output hidden states ``(B, T, H)``.

        Given the output ``head``, the logits come back as a :class:`HeadInput`: a pre-hook takes the head's
        input (the hidden states at ``keep``) and hands the head one position only, so no ``B x K x V``
        logits are made; the losses run the head chunk by chunk.
        """
        captured: list[torch.Tensor] = []
        handle = None
        if layer is not None:
            handle = layer.register_forward_hook(
                lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
        kwargs = {} if keep is None else {"logits_to_keep": keep}
        try:
            with head_input_taken(head) if head is not None else contextlib.nullcontext([]) as taken:
                logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], **kwargs).logits
        finally:
            if handle is not None:
                handle.remove()
        if head is not None:
            logits = HeadInput(taken[0], head.weight)
        return logits, (captured[0] if captured else None)

    def _reference(self, model, part: dict[str, torch.Tensor], keep, hidden: bool, fused: bool = False
                   ) -> tuple[torch.Tensor | HeadInput, torch.Tensor | None]:
        """The reference's outputs: the frozen copy's, or the same weights' with the LoRA adapter off.

        Dropout is switched off for the reference forward (and the previous mode restored): a reference
        must be a fixed function of the batch, and base-model dropout would make it noisy.
        """
        ref = self.ref_model if self.ref_model is not None else self.accelerator.unwrap_model(model)
        layer = self._ref_layer if hidden else None
        head = self._ref_head if fused else None
        was_training = ref.training
        ref.eval()
        try:
            with torch.no_grad():
                if self.ref_model is not None:
                    return self._run(ref, part, keep, layer, head)
                with ref.disable_adapter():
                    return self._run(ref, part, keep, layer, head)
        finally:
            ref.train(was_training)

    def _ensure_steering(self, hidden: torch.Tensor) -> None:
        """RMU's ``c * u``: drawn once from the run's seed when the hidden size is first seen, and kept on the
        hidden states' device (the loss subtracts it from them)."""
        if self.params.steering is None:
            vector = steering_vector(hidden.size(-1), self.steering_coeff, self.args.seed).to(hidden.device)
            self.params = dataclasses.replace(self.params, steering=vector)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``forget_coeff * F + retain_coeff * R`` of this micro-batch, each term weighted by its share of the
        optimizer step (:meth:`_weights`) and scaled by the process count (DDP averages the gradients): summed
        over the step it is the same objective on 1 process, N processes or N accumulation micro-batches.
        Called outside the training loop (no step), it is the plain objective of ``inputs``."""
        step = num_items_in_batch if isinstance(num_items_in_batch, StepUnits) else None
        processes = self.accelerator.num_processes if step is not None else 1
        if step is None:
            step = StepUnits(None, 1)
        outputs = {}
        for name in self.parts:
            part = inputs[name]
            wants_hidden = name in self.hidden_parts
            if name not in self.logit_parts:
                # only hidden states are read: one logit position keeps the output head's cost at nothing
                keep, labels = (1 if self.skip_unlabelled_logits else None), part["labels"]
            elif wants_hidden or name in self.every_position_parts:
                keep, labels = None, part["labels"]
            else:
                keep, labels = self._kept_positions(part["labels"])
            layer = self._layer if wants_hidden else None
            fused = name in self.fused_parts
            ref_logits = ref_hidden = None
            if name in self.ref_parts:
                ref_logits, ref_hidden = self._reference(model, part, keep, wants_hidden, fused)
            logits, hidden = self._run(model, part, keep, layer, self._head if fused else None)
            outputs[name] = PartOutput(logits, labels, ref_logits, hidden, ref_hidden)
        if "forget" in self.hidden_parts:
            self._ensure_steering(outputs["forget"].hidden)
        weights = self._weights(step, processes)
        forget = self.forget_term.compute(outputs, self.params)
        loss = self.forget_coeff * (weights["forget"] * processes) * forget
        components = {"forget_loss": (forget.detach(), weights["forget"])}
        if self.retain_term is not None:
            retain = self.retain_term.compute(outputs, self.params)
            coeff = self.dual_weight if self.dual_weight is not None else self.retain_coeff
            loss = loss + coeff * (weights["retain"] * processes) * retain
            components["retain_loss"] = (retain.detach(), weights["retain"])
            if self.dual_weight is not None:
                components["retain_weight"] = (torch.tensor(coeff), weights["retain"])
                step.retain += weights["retain"] * float(retain.detach())
        if model.training:
            self._record(components)
            step.done += 1
            if step.done == step.micro_batches:  # the step's last micro-batch: its global values are complete
                self._component_steps += 1
                if self.dual_weight is not None:
                    self._dual_update(step.retain)
        return (loss, outputs) if return_outputs else loss

    def _dual_update(self, retain: float) -> None:
        """PDU: one dual-ascent step on the retain weight from the step's retain loss (this process's weighted
        share, summed over processes: the global mean, the same on every process). Without ``--pdu_epsilon``
        the bound is the first step's retain loss: the constraint is "keep the retain loss where it started"."""
        value = float(self.accelerator.reduce(torch.tensor([retain], device=self.args.device), reduction="sum"))
        if self.dual_epsilon is None:
            self.dual_epsilon = value
            logger.info("PDU: retain-loss bound epsilon = %.4f (the first step's retain loss)", value)
        self.dual_weight = dual_step(self.dual_weight, value, self.dual_epsilon, self.dual_step_size)

    def dual_state(self) -> dict[str, float | None]:
        return {"weight": self.dual_weight, "epsilon": self.dual_epsilon}

    def load_dual_state(self, checkpoint: str | os.PathLike) -> None:
        """Restore PDU's weight and bound from a checkpoint written by ``_save_checkpoint``."""
        path = Path(checkpoint) / DUAL_STATE_FILE
        if self.dual_weight is not None and path.is_file():
            state = json.loads(path.read_text(encoding="utf-8"))
            self.dual_weight, self.dual_epsilon = state["weight"], state["epsilon"]

    def _record(self, components: dict[str, tuple[torch.Tensor, float]]) -> None:
        """Add each component's weighted value (its share of the step's global mean) to the running sums."""
        for key, (value, weight) in components.items():
            self._component_sums[key] = self._component_sums.get(key, 0.0) + weight * float(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the forget and retain losses (global means per step, averaged over the steps since the last log)."""
        if "loss" in logs and self._component_steps:
            keys = sorted(self._component_sums)
            totals = torch.tensor([self._component_sums[k] for k in keys], dtype=torch.float64)
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals.to(self.args.device), reduction="sum").cpu()
            for key, total in zip(keys, totals.tolist(), strict=True):
                logs[key] = total / self._component_steps
            self._component_sums, self._component_steps = {}, 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model, trial) -> None:
        """Save as usual, then commit ``checkpoint-<step>`` as ``checkpoint-epoch-<N>`` and rotate
        (:func:`commit_checkpoint`).

        The rename is the checkpoint's commit: a run killed mid-save leaves no ``checkpoint-epoch-*`` folder that
        ``--resume_from_checkpoint latest`` could pick up half-written. Every process writes its share of a
        DeepSpeed checkpoint: the main process commits first; then each other machine's main process commits the
        folder on its own disk when it is still there (machines without a shared file system)."""
        super()._save_checkpoint(model, trial)
        step_name = f"checkpoint-{self.state.global_step}"
        run_dir = Path(self.args.output_dir)
        self.accelerator.wait_for_everyone()
        if self.args.process_index == 0 and self.dual_weight is not None:
            (run_dir / step_name / DUAL_STATE_FILE).write_text(json.dumps(self.dual_state()), encoding="utf-8")
        commit_on_every_machine(run_dir, step_name, round(self.state.epoch or 0), self.args.save_total_limit,
                                self.args.process_index, self.args.local_process_index,
                                self.accelerator.wait_for_everyone)

    def _rotate_checkpoints(self, use_mtime: bool = False, output_dir: str | None = None) -> None:
        """transformers' rotation counts ``checkpoint-<step>`` folders; ours are renamed, so
        :func:`commit_checkpoint` rotates them instead."""


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
    from utils.utils import replace_folder

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
        if self.every > 0 and epoch % self.every == 0 and epoch < args.num_train_epochs:
            control.should_save = True
        return control


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
    (every step at the default --logging_steps 1); the full rows are in train_log.jsonl. The end-of-training
    summary (runtime, samples/s) still prints once."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "train_runtime" in logs:
            super().on_log(args, state, control, logs=logs, **kwargs)
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
