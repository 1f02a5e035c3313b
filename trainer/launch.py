"""How the run is launched: the DeepSpeed/accelerate settings of this process (read from the launch's
environment and checked against the arguments before any model loads), and the run's ``TrainingArguments``."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from pathlib import Path

from trainer.losses import LossSettings, needs_reference
from utils.errors import UserError

logger = logging.getLogger(__name__)


def _deepspeed_json() -> dict:
    """The DeepSpeed JSON file ``accelerate launch`` passes (``deepspeed_config_file``), or {}."""
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and Path(config_file).is_file():
        try:
            config = json.loads(Path(config_file).read_text(encoding="utf-8"))
            return config if isinstance(config, dict) else {}
        except ValueError:
            pass  # DeepSpeed itself reports a malformed file
    return {}


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage ``accelerate launch`` passes to this process (from its config or a DeepSpeed JSON), or
    ``None`` when not launched with DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    zero = _deepspeed_json().get("zero_optimization", {})
    if isinstance(zero, dict):
        stage = zero.get("stage", stage)
    try:
        return int(stage) if stage is not None else None
    except ValueError:
        return None


def use_bf16(args: argparse.Namespace) -> bool:
    """``--bf16``, by default the launch's own mixed precision (``accelerate launch``'s config, e.g.
    accelerate_config.yaml's bf16) and outside a launch bf16 on a CUDA GPU that supports it. An explicit
    ``--bf16`` wins over the launch's setting, which is then made to agree (accelerate and DeepSpeed read it)."""
    import torch

    from utils.loading import resolve_dtype

    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if args.bf16 is None:
        if launched:
            return launched == "bf16"
        return resolve_dtype("auto") is torch.bfloat16
    if launched and (launched == "bf16") != args.bf16:
        logger.info("--bf16 %s: replaces the launch's mixed_precision %s", args.bf16, launched)
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if args.bf16 else "no"
    return args.bf16


def launch_accumulation() -> int:
    """The gradient accumulation steps of ``accelerate launch``'s config (its variable, or a DeepSpeed JSON's
    integer value), else 1."""
    value = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if value is None or not value.isdigit():
        value = _deepspeed_json().get("gradient_accumulation_steps")
    return int(value) if isinstance(value, int | str) and str(value).isdigit() else 1


def resolve_max_grad_norm(args: argparse.Namespace, accumulation: int) -> float:
    """``--max_grad_norm``, by default what the original's launch clipped at: nothing with plain ``python`` (it
    clipped only ``if hasattr(args, 'max_grad_norm')``, an option it never defined); under DeepSpeed, ``1.0 x the
    accumulation steps``. Its yaml had no ``gradient_clipping``, which accelerate filled with 1.0 for DeepSpeed,
    while its loop divided each micro-batch's loss by the accumulation steps before DeepSpeed divided it again: the
    gradient DeepSpeed clipped at 1.0 was the step's mean-loss gradient divided by the accumulation steps
    (tests/trainer/test_original_clipping.py runs that loop on CPU DeepSpeed)."""
    if args.max_grad_norm is not None:
        return args.max_grad_norm
    if deepspeed_zero_stage() is not None:
        return 1.0 * accumulation
    return 0.0


def method_settings(args: argparse.Namespace) -> dict:
    """The method's settings from the command line, as :class:`~trainer.unlearn_trainer.UnlearnTrainingArguments`
    fields (the loss terms' flags are named as ``LossSettings`` fields)."""
    import dataclasses

    params = {f.name: getattr(args, f.name) for f in dataclasses.fields(LossSettings) if hasattr(args, f.name)}
    return {"loss_type": args.loss_type, "forget_coeff": args.forget_coeff, "retain_coeff": args.regularization_coeff,
            "loss_reduction": args.loss_reduction, "fused_head": args.fused_head_loss, "rmu_layer": args.rmu_layer,
            "rmu_steering_coeff": args.rmu_steering_coeff, "pdu_epsilon": args.pdu_epsilon,
            "pdu_dual_step_size": args.pdu_dual_step_size, **params}


def device_settings() -> dict:
    """``TrainingArguments`` fields for where this process runs. Without CUDA: ``use_cpu`` (else transformers
    refuses bf16 autocast on CPU), and with several processes the gloo backend (else every process trains alone,
    world size 1, on the same batches)."""
    import torch

    cpu = not torch.cuda.is_available()
    cpu_ddp = cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return {"use_cpu": cpu, "ddp_backend": "gloo" if cpu_ddp else None, "dataloader_pin_memory": not cpu}


def build_training_args(args: argparse.Namespace, out_dir: Path, bf16: bool):
    """The run's ``TrainingArguments``. Build them before the model: under DeepSpeed ZeRO-3 they make
    ``from_pretrained`` partition the weights while loading."""
    from trainer.config import UnlearnTrainingArguments

    accumulation = args.gradient_accumulation_steps
    if accumulation is None:
        accumulation = launch_accumulation()
    return UnlearnTrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=args.num_epochs,
        max_steps=getattr(args, "max_steps", -1),
        per_device_train_batch_size=args.bs,
        gradient_accumulation_steps=accumulation,
        learning_rate=args.lr,
        weight_decay=args.wd,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_ratio,  # a float in [0, 1) is a ratio of the optimizer steps
        max_grad_norm=resolve_max_grad_norm(args, accumulation),
        logging_steps=args.logging_steps,
        save_strategy="no",  # checkpoints every --save_steps epochs come from EpochCheckpointCallback
        save_total_limit=args.save_total_limit,  # counted over our checkpoint-epoch-N folders
        seed=args.seed,
        **({"train_sampling_strategy": "group_by_length"} if args.group_by_length else {}),
        bf16=bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        report_to=[] if args.report_to == "none" else [args.report_to],
        remove_unused_columns=False,  # batches are nested dicts of named parts
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        save_only_model=False,
        **device_settings(),  # use_cpu, gloo under several CPU processes, pinned memory on CUDA
        **method_settings(args),
    )


# TrainingArguments fields that DeepSpeed's config can contradict -> the option that sets them here
_OPTION_OF = {"per_device_train_batch_size": "--bs", "gradient_accumulation_steps": "--gradient_accumulation_steps",
              "train_batch_size (calculated)": "--bs x processes x --gradient_accumulation_steps",
              "max_grad_norm": "--max_grad_norm", "learning_rate": "--lr", "weight_decay": "--wd",
              "bf16|bf16_full_eval": "--bf16", "fp16|fp16_full_eval": "fp16 (not an option here)"}


def check_deepspeed(training_args, args: argparse.Namespace) -> None:
    """Under DeepSpeed (``accelerate launch`` with ``distributed_type: DEEPSPEED``), before any model loads: the
    DeepSpeed values must agree with the arguments (transformers would stop inside ``train()`` with a traceback),
    and ZeRO-3 must gather the weights to save them (else the adapter is written empty)."""
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is None:
        return
    import re

    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    probe = HfTrainerDeepSpeedConfig(copy.deepcopy(plugin.deepspeed_config))
    probe.trainer_config_process(training_args)
    # a config object registers itself as transformers' current one (what from_pretrained reads to partition
    # under ZeRO-3): hand that role back to the launch's own before the probe goes
    plugin.set_deepspeed_weakref()
    if probe.mismatches:
        found = []
        for line in probe.mismatches:
            match = re.match(r"- ds (\S+)=(.*) vs hf (.+)=(.*)$", line)
            if match is None:
                found.append(line.lstrip("- "))
                continue
            key, ds_value, field, value = match.groups()
            found.append(f"DeepSpeed {key} {ds_value} but {_OPTION_OF.get(field, field)} {value}")
        raise UserError("the DeepSpeed config of this launch disagrees with the arguments: " + "; ".join(found)
                        + ". Set those values to auto in the accelerate config (or DeepSpeed JSON), so that they "
                          "follow the arguments, or change the arguments")
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        if not zero.get("stage3_gather_16bit_weights_on_model_save"):
            raise UserError("DeepSpeed ZeRO-3 without zero3_save_16bit_model: true (the DeepSpeed key "
                            "stage3_gather_16bit_weights_on_model_save): each process holds a slice of the weights "
                            "and the final adapter would be saved empty; set it in the accelerate config")
        if args.lora_r == 0 and needs_reference(args.loss_type):
            raise UserError(f"--lora_r 0 with --loss_type {args.loss_type} under DeepSpeed ZeRO-3: the frozen "
                            "reference copy cannot be made from partitioned weights; use LoRA (the reference is "
                            "the adapter switched off) or ZeRO-2")


def close_process_group() -> None:
    """End a multi-process run's process group before the interpreter exits: left to the interpreter's teardown,
    gloo's and DeepSpeed's threads can abort a process that has finished its work ("terminate called without an
    active exception"), failing a run whose outputs are all written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
