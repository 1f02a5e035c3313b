"""The one Trainer subclass: forward passes over named batch parts, then ``forget_coeff * F + retain_coeff * R``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from ops.head import HeadInput, accepts_logits_to_keep, fusable_head, head_input_taken, kept_positions
from trainer.checkpoints import commit_on_every_machine
from trainer.config import DualWeight, UnlearnTrainingArguments
from trainer.losses import LOSSES, LossTerm, PartOutput, steering_vector

logger = logging.getLogger(__name__)

DUAL_STATE_FILE = "dual_state.json"


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

    def __init__(self, *args, ref_model: torch.nn.Module | None = None,
                 terms: tuple[LossTerm, LossTerm | None] | None = None, **kwargs) -> None:
        """``args``: :class:`UnlearnTrainingArguments` (the method and its settings). ``ref_model``: the frozen
        reference when every weight trains. ``terms``: (forget, retain) terms other than ``LOSSES[loss_type]``
        (benches that time a variant)."""
        super().__init__(*args, **kwargs)
        config: UnlearnTrainingArguments = self.args
        forget_term, retain_term = terms if terms is not None else LOSSES[config.loss_type]
        self.loss_reduction = config.loss_reduction
        self.forget_term = forget_term
        self.retain_term = retain_term
        self.forget_coeff = config.forget_coeff
        self.retain_coeff = config.retain_coeff
        self.terms = {key: t for key, t in (("forget", forget_term), ("retain", retain_term)) if t is not None}
        terms = list(self.terms.values())
        self.parts = tuple(dict.fromkeys(p for t in terms for p in t.parts))
        self.ref_parts = frozenset(p for t in terms if t.needs_ref for p in t.parts)
        self.hidden_parts = frozenset(p for t in terms if t.needs_hidden for p in t.parts)
        self.logit_parts = frozenset(p for t in terms if t.needs_logits for p in t.parts)
        unwrapped = self.accelerator.unwrap_model(self.model)
        # RMU's c * u, drawn once from the run's seed for the model's hidden size (a fixed function of the seed)
        steering = None
        if "forget" in self.hidden_parts:
            text_config = unwrapped.config.get_text_config() if hasattr(unwrapped.config, "get_text_config") \
                else unwrapped.config
            steering = steering_vector(text_config.hidden_size, config.rmu_steering_coeff, config.seed).to(
                config.device)
        self.params = config.loss_params(steering)
        self.every_position_parts = frozenset(p for t in terms if t.every_position is not None
                                              and t.every_position(self.params) for p in t.parts)
        # parts every reading term of which needs only per-token NLL / ME: no logits tensor is built for them
        self.fused_parts = frozenset(p for p in self.logit_parts if all(t.fusable for t in terms if p in t.parts)) \
            if config.fused_head else frozenset()
        self._component_sums: dict[str, float] = {}
        self._component_steps = 0
        # models without `logits_to_keep` (older or custom architectures) compute every position
        self.skip_unlabelled_logits = config.skip_unlabelled_logits and accepts_logits_to_keep(unwrapped)
        # the reference: a frozen copy when every weight trains (made only when a term needs it), else the
        # same weights with the LoRA adapter switched off
        self.ref_model = ref_model.to(self.args.device).eval().requires_grad_(False) if ref_model is not None \
            else None
        self._head = fusable_head(unwrapped) if self.fused_parts else None
        self._ref_head = (fusable_head(self.ref_model) if self.ref_model is not None else self._head) \
            if self.fused_parts else None
        self._layer = decoder_layers(unwrapped)[config.rmu_layer] if self.hidden_parts else None
        self._ref_layer = decoder_layers(self.ref_model)[config.rmu_layer] \
            if self.hidden_parts and self.ref_model is not None else self._layer
        # PDU: the retain weight is a dual variable, starting at the retain coefficient
        self.dual = DualWeight(config.retain_coeff, config.pdu_epsilon, config.pdu_dual_step_size) \
            if retain_term is not None and retain_term.dual else None

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
        (:func:`ops.head.kept_positions`); every position for a model without ``logits_to_keep``."""
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
        weights = self._weights(step, processes)
        forget = self.forget_term.compute(outputs, self.params)
        loss = self.forget_coeff * (weights["forget"] * processes) * forget
        components = {"forget_loss": (forget.detach(), weights["forget"])}
        if self.retain_term is not None:
            retain = self.retain_term.compute(outputs, self.params)
            coeff = self.dual.weight if self.dual is not None else self.retain_coeff
            loss = loss + coeff * (weights["retain"] * processes) * retain
            components["retain_loss"] = (retain.detach(), weights["retain"])
            if self.dual is not None:
                components["retain_weight"] = (torch.tensor(coeff), weights["retain"])
                step.retain += weights["retain"] * float(retain.detach())
        if model.training:
            self._record(components)
            step.done += 1
            if step.done == step.micro_batches:  # the step's last micro-batch: its global values are complete
                self._component_steps += 1
                if self.dual is not None:
                    self._dual_update(step.retain)
        return (loss, outputs) if return_outputs else loss

    def _dual_update(self, retain: float) -> None:
        """PDU's dual step from the step's retain loss (this process's weighted share, summed over processes: the
        global mean, the same on every process)."""
        self.dual.update(float(self.accelerator.reduce(torch.tensor([retain], device=self.args.device),
                                                       reduction="sum")))

    def load_method_state(self, checkpoint: str | os.PathLike) -> None:
        """Restore the method's state (PDU's dual weight and bound) from a checkpoint written by
        ``_save_checkpoint``."""
        path = Path(checkpoint) / DUAL_STATE_FILE
        if self.dual is not None and path.is_file():
            self.dual.load_state_dict(json.loads(path.read_text(encoding="utf-8")))

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
        if self.args.process_index == 0 and self.dual is not None:
            (run_dir / step_name / DUAL_STATE_FILE).write_text(json.dumps(self.dual.state_dict()), encoding="utf-8")
        commit_on_every_machine(run_dir, step_name, round(self.state.epoch or 0), self.args.save_total_limit,
                                self.args.process_index, self.args.local_process_index,
                                self.accelerator.wait_for_everyone)

    def _rotate_checkpoints(self, use_mtime: bool = False, output_dir: str | None = None) -> None:
        """transformers' rotation counts ``checkpoint-<step>`` folders; ours are renamed, so
        :func:`commit_checkpoint` rotates them instead."""
