"""The training path both forget scripts share: validate → build model and data → train → save."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import string
from pathlib import Path
from typing import NamedTuple

from dataset.data_module import ForgetRetainCollator, ForgetRetainDataset, QAItem, load_lines, load_qa_jsonl
from trainer.losses import LOSSES, LossParams, needs_hidden, needs_idk, needs_reference
from utils.utils import (
    PROJECT_ROOT,
    UserError,
    check_model_folder,
    family_names,
    load_chat_template,
    missing_tag_tokens,
    seed_everything,
    write_json,
    write_jsonl,
)

logger = logging.getLogger(__name__)

FINAL_DIR = "final_lora_model"
FULL_DIR = "final_model"  # --lora_r 0: the whole model, nothing to merge


def final_dir_name(args: argparse.Namespace) -> str:
    """``final_lora_model`` for a LoRA run, ``final_model`` when every weight trained (``--lora_r 0``)."""
    return FULL_DIR if args.lora_r == 0 else FINAL_DIR

# The original scripts' per-script defaults (forget_me_gd.py / forget_idk_ap.py of the competition's code), but
# save_steps: 1 epoch here (resumable by default), 10 / 100 in the original (never a checkpoint in a default run).
SCRIPT_DEFAULTS: dict[str, dict] = {
    "me_gd": {"loss_type": "ME+GD", "max_length": 400, "forget_coeff": 0.9, "num_epochs": 5, "save_steps": 1},
    "idk_ap": {"loss_type": "IDK+AP", "max_length": 288, "forget_coeff": 0.5, "num_epochs": 3, "save_steps": 1,
               "output_dir": "${save_root}/${loss_type}_epoch${num_epochs}_${lr}_mask${mask}_${forget_coeff}"
                             "_${regularization_coeff}"},
}
LOG_FILE = "train_log.jsonl"
# forget terms defined on answer tokens (open-unlearning's methods): --mask false deserves a warning
ANSWER_METHODS = frozenset({"SimNPO", "UNDIAL", "WGA", "SatImp", "CE-U", "PDU", "RMU"})
ARGS_FILE = "run_args.json"


def resolve_output_dir(args: argparse.Namespace) -> Path:
    """Fill ``${name}`` placeholders of ``--output_dir`` from the arguments (an unknown name is an error)."""
    values = {k: str(v) for k, v in vars(args).items()}
    try:
        return Path(string.Template(args.output_dir).substitute(values))
    except KeyError as err:
        raise UserError(f"--output_dir: unknown name ${{{err.args[0]}}}; known: {', '.join(sorted(values))}") from None
    except ValueError as err:
        raise UserError(f"--output_dir: {err}") from None


def _resolve_resume(args: argparse.Namespace, out_dir: Path) -> str | None:
    from trainer.unlearn_trainer import latest_checkpoint

    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        found = latest_checkpoint(out_dir)
        if found is None:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s; starting from scratch", out_dir)
            return None
        return str(found)
    path = Path(args.resume_from_checkpoint)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume_from_checkpoint {path}: not a training checkpoint (no trainer_state.json)")
    return str(path)


class TrainingData(NamedTuple):
    """The parsed input files of a run."""

    forget: list[QAItem]
    retain: list[QAItem]
    idk: list[str] | None


def read_data(args: argparse.Namespace) -> TrainingData:
    """Parse the forget/retain files (and the refusals when the loss reads them); errors name file and line."""
    idk = load_lines(args.idk_data_path) if needs_idk(args.loss_type) else None
    return TrainingData(load_qa_jsonl(args.forget_data_path), load_qa_jsonl(args.retain_data_path), idk)


def build_dataset(args: argparse.Namespace, tokenizer, template, data: TrainingData | None = None
                  ) -> ForgetRetainDataset:
    """Tokenise the run's data (read from the files unless ``data`` is given)."""
    forget, retain, idk = data if data is not None else read_data(args)
    return ForgetRetainDataset(forget, retain, tokenizer, template, args.max_length, mask=args.mask, idk_lines=idk,
                               pad_to_max_length=args.pad_to_max_length, retain_sampling=args.retain_sampling,
                               seed=args.seed)


def validate(args: argparse.Namespace) -> tuple[Path, object, TrainingData]:
    """Every check that needs no model: fails in seconds, before anything heavy is loaded."""
    template = load_chat_template(args.model_family, args.model_config)
    check_model_folder(args.model_path)
    data = read_data(args)
    for flag in ("max_length", "num_epochs", "bs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    for flag in ("lora_r", "ceu_skip_tokens", "rmu_layer", "save_total_limit"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be at least 0")
    if needs_hidden(args.loss_type):
        layers = _num_layers(args, template)
        if layers is not None and args.rmu_layer >= layers:
            raise UserError(f"--rmu_layer {args.rmu_layer}: the model has {layers} decoder layers "
                            f"(0..{layers - 1}); pick one of them")
    if args.eval_tofu:
        from evals.tofu_cli import load_log, set_paths

        if deepspeed_zero_stage() == 3:
            raise UserError("--eval_tofu under DeepSpeed ZeRO-3: each process holds only a slice of the weights, so "
                            "none can generate alone; train with ZeRO-2 (accelerate_config.yaml), or merge the "
                            "adapter and run evaluate_tofu.py (it splits the sets across processes)")

        set_paths(args)
        if args.tofu_retain_result:
            load_log(args.tofu_retain_result, "--tofu_retain_result")
    if args.report_to != "none":
        import importlib.util

        module = {"tensorboard": "tensorboard", "wandb": "wandb", "swanlab": "swanlab"}.get(args.report_to)
        if module is None:
            raise UserError(f"--report_to must be none, tensorboard, wandb or swanlab, not {args.report_to!r}")
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--report_to {args.report_to}: the {module} package is not installed "
                            f"(pip install {module})")
    if args.max_grad_norm is not None and args.max_grad_norm < 0:
        raise UserError("--max_grad_norm must be at least 0 (0: no clipping)")
    if args.me_floor < 0:
        raise UserError("--me_floor must be at least 0 (0: the exact closed form)")
    if not 0 <= args.warmup_ratio < 1:
        raise UserError("--warmup_ratio must be in [0, 1)")
    if not args.mask and args.loss_type.split("+")[0] in ANSWER_METHODS:
        logger.warning("--loss_type %s with --mask false: the forget loss also covers the question, which the "
                       "model never memorised (the method's papers train on answers; SimNPO, for one, starts "
                       "saturated and does not move). Pass --mask true unless you mean it.", args.loss_type)
    out_dir = resolve_output_dir(args)
    final = out_dir / final_dir_name(args)
    if final.exists() and not args.overwrite and args.resume_from_checkpoint is None:
        raise UserError(f"{final} already exists; pass --overwrite to replace it "
                        "or choose another --output_dir")
    return out_dir, template, data


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


def _num_layers(args: argparse.Namespace, template) -> int | None:
    """The model's decoder layer count from its config (``None`` when the config does not say)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model_path,
                                        trust_remote_code=args.trust_remote_code or template.trust_remote_code)
    return getattr(config.get_text_config(), "num_hidden_layers", None)


def trained_layers(args: argparse.Namespace) -> list[int] | None:
    """RMU trains only the steered layer and the two below it (as WMDP's RMU); other methods: every layer."""
    if not needs_hidden(args.loss_type):
        return None
    return list(range(max(0, args.rmu_layer - 2), args.rmu_layer + 1))


def loss_params(args: argparse.Namespace) -> LossParams:
    """The terms' hyper-parameters from the command line (flags named as ``LossParams`` fields)."""
    import dataclasses

    return LossParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LossParams)
                         if hasattr(args, f.name)})


def _in_layers(layers: list[int] | None):
    """A test of a parameter/module name: does it lie in one of ``layers`` (every name when ``None``)?"""
    import re

    pattern = re.compile(r"\.layers\.(\d+)\.")

    def test(name: str) -> bool:
        found = pattern.search(name)
        return layers is None or (found is not None and int(found.group(1)) in layers)

    return test


def load_tokenizer(args: argparse.Namespace, template):
    """The model folder's tokenizer (pad = EOS when it has no pad token, as the original)."""
    from utils.loading import load_tokenizer as load
    from utils.loading import trusts_remote_code

    tokenizer = load(args.model_path, trust_remote_code=trusts_remote_code(args.trust_remote_code, template))
    missing = missing_tag_tokens(template, tokenizer)
    if missing:
        logger.warning("--model_family %s: the tokenizer of %s has no token %s: the family's chat tags do not "
                       "fit this model (pick its family: %s)", args.model_family, args.model_path,
                       ", ".join(missing), family_names(args.model_config))
    return tokenizer


def build_model(args: argparse.Namespace, template, bf16: bool, deepspeed: bool = False):
    """Load the base model (:func:`utils.loading.load_model`) and wrap it with a fresh LoRA adapter (``--lora_r 0``:
    return the model itself, every weight trainable, or for RMU only its :func:`trained_layers`).

    Weights: :func:`utils.loading.weights_dtype` (full fine-tuning in bf16 without DeepSpeed keeps float32 weights
    under bf16 autocast). Under DeepSpeed ZeRO-3 the run's ``TrainingArguments`` must exist before this call, so
    that ``from_pretrained`` partitions the weights while it loads (``zero.Init``) instead of every process
    holding the whole model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from utils.loading import load_model, trusts_remote_code, weights_dtype

    model = load_model(args.model_path, dtype=weights_dtype(bf16, args.lora_r == 0, deepspeed), device=None,
                       trust_remote_code=trusts_remote_code(args.trust_remote_code, template),
                       attn_implementation=template.attn_implementation, trainable_adapter=True)
    model.config.use_cache = False
    if deepspeed_zero_stage() == 3:
        _report_partitioning(model)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
    layers = trained_layers(args)
    in_layers = _in_layers(layers)
    if args.lora_r == 0:
        if layers is not None:
            for name, param in model.named_parameters():
                param.requires_grad = in_layers(name)
        return model
    targets = args.lora_target_modules
    target_modules = targets[0] if targets == ["all-linear"] else targets
    if layers is not None:  # the chosen layers' linear modules (matching --lora_target_modules unless all-linear)
        target_modules = [name for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear) and in_layers(name + ".")
                          and (targets == ["all-linear"] or name.rsplit(".", 1)[-1] in targets)]
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    seed_everything(args.seed)  # LoRA's initialisation draws from the global RNG
    return get_peft_model(model, lora)


def _report_partitioning(model) -> None:
    """Under ZeRO-3, say whether ``from_pretrained`` partitioned the weights while loading (``zero.Init``: each
    process holds a slice) or every process holds the whole model (loaded before the run's TrainingArguments)."""
    params = list(model.parameters())
    whole = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    if all(hasattr(p, "ds_id") for p in params):
        held = sum(int(p.ds_tensor.numel()) for p in params)
        logger.info("ZeRO-3: weights partitioned while loading (this process holds %d of %d elements)", held, whole)
    else:
        logger.warning("ZeRO-3: the weights were loaded whole on every process (%d elements each)", whole)


def _use_bf16(args: argparse.Namespace) -> bool:
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


def build_training_args(args: argparse.Namespace, out_dir: Path, bf16: bool):
    """The run's ``TrainingArguments``. Build them before the model: under DeepSpeed ZeRO-3 they make
    ``from_pretrained`` partition the weights while loading."""
    import torch

    from trainer.unlearn_trainer import UnlearnTrainingArguments

    # Without CUDA: use_cpu (else transformers refuses bf16 autocast on CPU), and with several processes gloo
    # (else every process would train alone, world size 1, all of them writing the same run folder).
    cpu = not torch.cuda.is_available()
    cpu_ddp = cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accumulation = args.gradient_accumulation_steps
    if accumulation is None:
        accumulation = launch_accumulation()
    return UnlearnTrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=args.num_epochs,
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
        dataloader_pin_memory=torch.cuda.is_available(),
        save_only_model=False,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu_ddp else None,
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


def _trim_log(path: Path, last_step: int) -> None:
    """On resume, drop log rows written after the checkpoint (they will be logged again)."""
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        write_jsonl(path, [r for r in rows if r.get("step", 0) <= last_step])


def train(args: argparse.Namespace) -> Path:
    """Run one unlearning job; returns the folder of the final adapter."""
    from transformers import TrainerState
    from transformers.trainer_callback import ProgressCallback

    from trainer.unlearn_trainer import (
        DatasetEpochCallback,
        EpochCheckpointCallback,
        JsonlLogCallback,
        QuietProgressCallback,
        UnlearnTrainer,
    )

    out_dir, template, data = validate(args)
    resume = _resolve_resume(args, out_dir)
    bf16 = _use_bf16(args)
    training_args = build_training_args(args, out_dir, bf16)  # before the model: ZeRO-3 partitions it as it loads
    check_deepspeed(training_args, args)
    if args.max_grad_norm is None and training_args.max_grad_norm > 0:
        logger.info("clipping gradients at %g (1.0 x %d accumulation steps), as the original's DeepSpeed launch did "
                    "(README, \"Differences\"); --max_grad_norm to choose", training_args.max_grad_norm,
                    training_args.gradient_accumulation_steps)
    tokenizer = load_tokenizer(args, template)
    dataset = build_dataset(args, tokenizer, template, data)  # all input errors surface before the model loads
    model = build_model(args, template, bf16, deepspeed=training_args.deepspeed_plugin is not None)
    # full fine-tuning has no adapter to switch off: a frozen copy is the reference, made only when read
    ref_model = copy.deepcopy(model) if args.lora_r == 0 and needs_reference(args.loss_type) else None
    per_round = args.bs * training_args.world_size
    if training_args.world_size > 1 and len(dataset) % per_round:
        logger.warning("%d forget items are not a multiple of --bs x processes (%d): each epoch's last step is "
                       "filled by repeating its first items (every process must step), so it differs from a "
                       "1-process run with the same global batch", len(dataset), per_round)
    forget_term, retain_term = LOSSES[args.loss_type]
    trainer = UnlearnTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=ForgetRetainCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        forget_term=forget_term,
        retain_term=retain_term,
        forget_coeff=args.forget_coeff,
        retain_coeff=args.regularization_coeff,
        params=loss_params(args),
        ref_model=ref_model,
        hidden_layer=args.rmu_layer,  # read only when a term needs hidden states
        steering_coeff=args.rmu_steering_coeff,
        dual_epsilon=args.pdu_epsilon,
        dual_step_size=args.pdu_dual_step_size,
        loss_reduction=args.loss_reduction,
        fused_head=args.fused_head_loss,
        callbacks=[EpochCheckpointCallback(args.save_steps), JsonlLogCallback(out_dir / LOG_FILE),
                   DatasetEpochCallback(dataset)],
    )
    if trainer.pop_callback(ProgressCallback) is not None:  # present unless --disable_tqdm-like settings
        trainer.add_callback(QuietProgressCallback)
    if resume is not None:
        trainer.load_dual_state(resume)
    if trainer.is_world_process_zero():
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = out_dir / LOG_FILE
        if resume is None:
            log_path.unlink(missing_ok=True)
        else:
            _trim_log(log_path, TrainerState.load_from_json(str(Path(resume) / "trainer_state.json")).global_step)
        record = {**vars(args), "output_dir": str(out_dir), "resolved_from": args.output_dir,
                  "gradient_accumulation_steps": training_args.gradient_accumulation_steps, "bf16": bf16,
                  "max_grad_norm": training_args.max_grad_norm,
                  "world_size": training_args.world_size, "train_items": len(dataset), "resumed_from": resume}
        write_json(out_dir / ARGS_FILE, record)
    logger.info("training %s on %d forget items for %d epoch%s -> %s", args.loss_type, len(dataset), args.num_epochs,
                "" if args.num_epochs == 1 else "s",
                out_dir)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        from trainer.unlearn_trainer import latest_checkpoint

        found = latest_checkpoint(out_dir)
        raise KeyboardInterrupt(
            f"the last complete checkpoint is {found}; run the same command with --resume_from_checkpoint latest "
            "to continue from it" if found else
            "no checkpoint was written yet (one is written every --save_steps epochs)") from None
    final = save_final(trainer, out_dir, final_dir_name(args))
    if args.eval_tofu:
        evaluate_on_tofu(args, trainer, tokenizer, template, out_dir)
    close_process_group()
    return final


def close_process_group() -> None:
    """End a multi-process run's process group before the interpreter exits: left to the interpreter's teardown,
    gloo's and DeepSpeed's threads can abort a process that has finished its work ("terminate called without an
    active exception"), failing a run whose outputs are all written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def evaluate_on_tofu(args: argparse.Namespace, trainer, tokenizer, template, out_dir: Path) -> None:
    """``--eval_tofu``: TOFU logs and summary of the trained model in ``<run>/tofu_eval``, every process
    evaluating its share of the batches (:mod:`evals.shard`), the main process writing."""
    from evals.shard import Shard
    from evals.tofu_cli import format_table, run_evaluation, set_paths

    shard = Shard(trainer.accelerator.process_index, trainer.accelerator.num_processes)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    stats = run_evaluation(model, tokenizer, template, set_paths(args), out_dir / "tofu_eval",
                           args.tofu_retain_result, args.ds_size, args.tofu_batch_size, shard,
                           args.tofu_generation_batch_size)
    if shard.is_main:
        logger.info("TOFU evaluation (%s):\n%s", out_dir / "tofu_eval", format_table(stats))


def save_final(trainer, out_dir: Path, name: str = FINAL_DIR) -> Path:
    """Save adapter (or whole model) + tokenizer to a temporary folder, then swap it in as ``name``
    (:func:`utils.utils.replace_folder`: a kill leaves the previous final folder or the new one, never neither).
    An adapter saved without weights (ZeRO-3 that did not gather them) is an error, not a finished folder."""
    import shutil

    from utils.utils import recover_folder, replace_folder

    final, tmp = out_dir / name, out_dir / f".{name}.tmp"
    if trainer.is_world_process_zero():
        recover_folder(final)
        if tmp.exists():
            shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the arguments are in run_args.json
        empty = empty_weights(tmp)
        if empty:
            raise RuntimeError(f"the saved weights in {tmp} are empty ({', '.join(empty[:3])}, ...): nothing was "
                               "gathered from the processes; the final folder was not written")
        replace_folder(tmp, final)
        logger.info("saved the final %s to %s", "model" if name == FULL_DIR else "adapter", final)
    trainer.accelerator.wait_for_everyone()
    return final


def empty_weights(folder: Path) -> list[str]:
    """Names of the weight tensors saved in ``folder`` that hold no value (and ``[]`` when every one has values);
    a folder with no weight file at all counts as empty."""
    from safetensors import safe_open

    empty, count = [], 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                count += 1
                if 0 in fh.get_slice(key).get_shape():
                    empty.append(key)
    return empty if count else ["(no weight tensor at all)"]


def build_parser(method: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of a forget script, with that script's defaults (``SCRIPT_DEFAULTS[method]``)."""
    from trainer.arguments import add_unlearn_args
    from utils.utils import ScriptParser

    parser = ScriptParser(description)
    add_unlearn_args(parser, loss_choices=sorted(LOSSES), **SCRIPT_DEFAULTS[method])
    return parser


def main_for(method: str, argv: list[str] | None, description: str) -> Path:
    """Parse a forget script's arguments (defaults by ``method``) and train."""
    from utils.utils import setup_logging

    args = build_parser(method, description).parse_args(argv)
    if not Path(args.idk_data_path).is_absolute() and not Path(args.idk_data_path).exists():
        candidate = PROJECT_ROOT / args.idk_data_path
        if candidate.exists():
            args.idk_data_path = str(candidate)
    setup_logging()
    return train(args)
