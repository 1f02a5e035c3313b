"""The model a run trains: the base model through the one loader (``--load_in_4bit``: quantised to 4-bit NF4,
QLoRA), with a fresh LoRA adapter (or every weight, or RMU's layers only), and its tokenizer checked against the
family's chat tags."""

from __future__ import annotations

import argparse
import logging

from trainer.launch import deepspeed_zero_stage
from trainer.losses import needs_hidden
from utils.chat_template import missing_tag_tokens
from utils.cli import family_names, seed_everything
from utils.errors import UserError

logger = logging.getLogger(__name__)


def num_layers(args: argparse.Namespace, template) -> int | None:
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


def _in_layers(layers: list[int] | None):
    """A test of a parameter/module name: does it lie in one of ``layers`` (every name when ``None``)?"""
    import re

    pattern = re.compile(r"\.layers\.(\d+)\.")

    def test(name: str) -> bool:
        found = pattern.search(name)
        return layers is None or (found is not None and int(found.group(1)) in layers)

    return test


def check_load_in_4bit(args: argparse.Namespace, deepspeed: bool = False) -> None:
    """``--load_in_4bit``'s rules, checked before any model loads: a LoRA run (a 4-bit weight cannot be trained),
    no DeepSpeed (the 4-bit base is placed whole on each process's device while it loads; ZeRO would partition
    it), and bitsandbytes installed and able to quantise on this process's device."""
    if not args.load_in_4bit:
        return
    if args.lora_r == 0:
        raise UserError("--load_in_4bit with --lora_r 0: 4-bit weights cannot be trained, so full fine-tuning of a "
                        "4-bit model is impossible; give --lora_r N (QLoRA trains a LoRA adapter on the frozen "
                        "4-bit base) or drop --load_in_4bit")
    stage = deepspeed_zero_stage()
    if deepspeed or stage is not None:
        raise UserError(f"--load_in_4bit under DeepSpeed{f' ZeRO-{stage}' if stage is not None else ''}: the 4-bit "
                        "base is loaded whole on each process's GPU, which DeepSpeed cannot partition or wrap; "
                        "launch without DeepSpeed (python, or accelerate launch --multi_gpu for data parallel "
                        "processes), or drop --load_in_4bit")
    from utils.loading import check_4bit_runs, process_device

    check_4bit_runs(process_device())


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
    holding the whole model.

    ``--load_in_4bit`` (QLoRA, :func:`check_load_in_4bit`'s rules): the linear layers load as 4-bit NF4 weights
    (:func:`utils.loading.quantization_config`; compute in the weights' dtype) placed on this process's device
    (a bitsandbytes model cannot be moved after loading), then :func:`peft.prepare_model_for_kbit_training`
    (everything frozen, the norms, embeddings and head upcast to float32) before the adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    from utils.loading import load_model, process_device, trusts_remote_code, weights_dtype

    check_load_in_4bit(args, deepspeed)
    quantized = args.load_in_4bit
    model = load_model(args.model_path, dtype=weights_dtype(bf16, args.lora_r == 0, deepspeed),
                       device=process_device() if quantized else None,
                       trust_remote_code=trusts_remote_code(args.trust_remote_code, template),
                       attn_implementation=template.attn_implementation, trainable_adapter=True,
                       quantization="nf4" if quantized else None)
    model.config.use_cache = False
    if deepspeed_zero_stage() == 3:
        _report_partitioning(model)
    if quantized:
        from peft import prepare_model_for_kbit_training

        # the same checkpointing as the Trainer's (trainer.launch: use_reentrant False)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
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
