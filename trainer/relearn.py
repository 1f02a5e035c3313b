"""The relearning attack: fine-tune a model on question/answer pairs (the forget set, or part of it) and look
at it at chosen steps on the way.

OpenUnlearning's meta-evaluation relearns 1 epoch at lr 2e-5 on the forget set; MUSE-style curves relearn
for a number of steps (Fan et al.: 50/75/100 steps at lr 1e-5). The learning rate is constant (no warm-up, no
decay), so the model seen at step 10 of a 100-step curve is the model a 10-step attack gives. The samples are
training's (chat tags, question masked, EOS label); the Trainer owns the loop.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from utils.chat_template import ChatTemplate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelearnSettings:
    """How the attack fine-tunes: ``steps`` (> 0) wins over ``epochs``; ``lora`` trains a fresh LoRA adapter
    (rank 8, every linear layer) instead of every weight."""

    lr: float = 2e-5
    epochs: float = 1.0
    steps: int = 0
    batch_size: int = 4
    lora: bool = False
    seed: int = 0
    max_length: int = 512


def relearn(model, tokenizer, template: ChatTemplate, pairs: Sequence[tuple[str, str]],
            settings: RelearnSettings = RelearnSettings(), look_at: Sequence[int] = (),
            on_look: Callable[[int, object], None] | None = None, processes: int = 1):
    """Fine-tune ``model`` in place on ``pairs`` and return it (in eval mode; with ``settings.lora`` the adapter
    is merged in). ``on_look(step, model)`` is called after each optimizer step listed in ``look_at`` (the model
    in eval mode for the call). Returns the model and the number of optimizer steps taken.

    ``settings.batch_size`` is the batch of one optimizer step over all ``processes`` (the Trainer's DDP under
    ``accelerate launch``): each process takes its share, so 2 processes take the steps one process takes."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from dataset.encoding import encode_qa
    from trainer.launch import device_settings

    if settings.batch_size % processes:
        raise ValueError(f"a relearning batch of {settings.batch_size} does not split over {processes} processes")
    samples = [encode_qa(tokenizer, template, q, a, max_length=settings.max_length, mask=True) for q, a in pairs]
    samples = [{**s, "attention_mask": [1] * len(s["input_ids"])} for s in samples if s is not None]
    if not samples:
        raise ValueError("no pair has an answer token to relearn")
    if processes > 1 and len(samples) % settings.batch_size:
        logger.warning("%d pairs are not a multiple of the relearning batch %d: over %d processes the last step is "
                       "filled by repeating the first pairs, so it differs from a 1-process run", len(samples),
                       settings.batch_size, processes)
    if settings.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    looks = set(look_at)

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if on_look is not None and state.global_step in looks:
                was_training = model.training
                model.eval()
                on_look(state.global_step, model)
                model.train(was_training)

    with tempfile.TemporaryDirectory(prefix="relearn-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, num_train_epochs=settings.epochs, max_steps=settings.steps or -1,
            per_device_train_batch_size=settings.batch_size // processes, learning_rate=settings.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, seed=settings.seed,
            save_strategy="no", report_to=[], logging_strategy="no", disable_tqdm=True,
            ddp_find_unused_parameters=False, **device_settings(),
        )
        if args.world_size != processes:
            raise RuntimeError(f"relearning sees {args.world_size} processes, the evaluation {processes}")
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=collator,
                          callbacks=[Look()])
        trainer.remove_callback(PrinterCallback)  # no dict of run metrics on screen; the log line below says it
        steps = trainer.train().global_step
    if settings.lora:
        model = model.merge_and_unload()
    logger.info("relearned %d pairs for %d steps at lr %g", len(samples), steps, settings.lr)
    return model.eval(), steps
