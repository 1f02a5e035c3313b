"""The method's settings and state: one typed config (a ``TrainingArguments`` subclass the Trainer saves with the
run) and PDU's dual weight, a small object with ``state_dict()``."""

from __future__ import annotations

import dataclasses
import logging

import torch
from transformers import TrainingArguments

from trainer.losses import LOSSES, LossParams, LossSettings, dual_step

logger = logging.getLogger(__name__)

# --loss_reduction: a global mean over the optimizer step (invariant to how its items are split), or the
# original's mean per micro-batch, averaged over micro-batches and processes
LOSS_REDUCTIONS = ("global", "micro_batch")


@dataclasses.dataclass
class UnlearnTrainingArguments(LossSettings, TrainingArguments):
    """``TrainingArguments`` with the unlearning method's settings, typed and saved with the run's arguments (TRL's
    pattern: one config holds every hyper-parameter). The loss terms' hyper-parameters are inherited from
    :class:`~trainer.losses.LossSettings`, declared there once (:meth:`loss_params` hands them to the terms).

    Also: the warm-up ratio rounds down, as the original scripts' did (``int(warmup_ratio * total_steps)``;
    transformers rounds up: 30 steps at 0.05 give 1 step, not 2), and one process never trains on several GPUs
    (``nn.DataParallel``)."""

    loss_type: str = dataclasses.field(default="ME+GD", metadata={"help": "the objective, a key of LOSSES"})
    forget_coeff: float = dataclasses.field(default=1.0, metadata={"help": "weight of the forget term"})
    retain_coeff: float = dataclasses.field(default=1.0, metadata={"help": "weight of the retain term (PDU: the "
                                                                            "dual weight's start)"})
    loss_reduction: str = dataclasses.field(default="global", metadata={"help": f"one of {LOSS_REDUCTIONS}"})
    fused_head: bool = dataclasses.field(default=True, metadata={"help": "per-token losses from the head's input"})
    skip_unlabelled_logits: bool = dataclasses.field(default=True, metadata={
        "help": "run the output head only at positions some loss reads"})
    rmu_layer: int | None = dataclasses.field(default=None, metadata={"help": "RMU's decoder layer"})
    rmu_steering_coeff: float = dataclasses.field(default=6.5, metadata={"help": "RMU's c"})
    pdu_epsilon: float | None = dataclasses.field(default=None, metadata={
        "help": "PDU's retain-loss bound (None: the first step's retain loss)"})
    pdu_dual_step_size: float = dataclasses.field(default=1.0, metadata={"help": "PDU's dual step size"})
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in LOSSES:
            raise ValueError(f"loss_type must be one of {sorted(LOSSES)}, not {self.loss_type!r}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, not {self.loss_reduction!r}")

    def loss_params(self, steering: torch.Tensor | None = None) -> LossParams:
        """The terms' hyper-parameters (and RMU's steering vector, made by the trainer)."""
        names = [f.name for f in dataclasses.fields(LossSettings)]
        return LossParams(**{name: getattr(self, name) for name in names}, steering=steering)

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


class DualWeight:
    """PDU's retain weight, a dual variable: one dual-ascent step per optimizer step
    (:func:`~trainer.losses.dual_step`). Without a bound (``--pdu_epsilon``) the first step's retain loss becomes
    it: the constraint is "keep the retain loss where it started"."""

    def __init__(self, weight: float, epsilon: float | None, step_size: float) -> None:
        self.weight, self.epsilon, self.step_size = weight, epsilon, step_size

    def update(self, retain_loss: float) -> None:
        if self.epsilon is None:
            self.epsilon = retain_loss
            logger.info("PDU: retain-loss bound epsilon = %.4f (the first step's retain loss)", retain_loss)
        self.weight = dual_step(self.weight, retain_loss, self.epsilon, self.step_size)

    def state_dict(self) -> dict[str, float | None]:
        return {"weight": self.weight, "epsilon": self.epsilon}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.weight, self.epsilon = state["weight"], state["epsilon"]
