"""The one model loader: every script loads its model, adapter and tokenizer here, under one dtype policy, one
device policy and one ``trust_remote_code`` rule.

dtype (``dtype="auto"``): bfloat16 on a CUDA GPU that supports it, float32 everywhere else. Training asks
:func:`weights_dtype` instead: a model whose every weight trains (``--lora_r 0``) keeps float32 weights under
bfloat16 autocast unless DeepSpeed holds the float32 master copy itself (bfloat16 weights updated by AdamW
lose most small updates to rounding); a LoRA run's frozen base is stored in bfloat16 and its adapter in
float32 (peft upcasts it).

device (``device="auto"``): this process's GPU (``LOCAL_RANK`` under ``accelerate launch``/``torchrun``), or the
CPU without one; a model that does not fit on that GPU, or ``tensor_parallel_size > 1``, is spread over the
visible GPUs with ``device_map="auto"``. ``device=None`` leaves the model where ``from_pretrained`` put it
(training: the Trainer or DeepSpeed places it, and under ZeRO-3 ``from_pretrained`` partitions it while it
loads, provided the run's ``TrainingArguments`` exist first).

trust: a model folder's own Python code runs only when the user passes ``--trust_remote_code`` or the model
family in ``config/model_config.yaml`` says ``trust_remote_code: true`` (:func:`trusts_remote_code`); the same
rule for training, evaluation, generation and merging. Weights are read from safetensors only: a folder with
only pickled ``*.bin`` weights is refused, never unpickled.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from utils.chat_template import ChatTemplate
from utils.errors import UserError
from utils.files import check_adapter_folder, check_model_folder

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
# share of a GPU's free memory the weights may take before the model is spread over several GPUs (the rest:
# activations, the KV cache)
FIT_SHARE = 0.8


def resolve_dtype(name: str | Any = "auto"):
    """A torch dtype by name (or a dtype itself); ``auto`` is bfloat16 on a CUDA GPU that supports it, else
    float32."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; one of {', '.join(DTYPES)}") from None


def weights_dtype(bf16: bool, trains_every_weight: bool, deepspeed: bool):
    """The dtype training loads the weights in: bfloat16 for a bf16 run, except that a run training every
    weight without DeepSpeed keeps float32 weights (bf16 autocast computes in bfloat16; AdamW updates float32)."""
    import torch

    if not bf16 or (trains_every_weight and not deepspeed):
        return torch.float32
    return torch.bfloat16


def trusts_remote_code(flag: bool, template: ChatTemplate | None = None) -> bool:
    """The one rule: run a model folder's own code when ``--trust_remote_code`` says so or its family does."""
    return bool(flag) or bool(template is not None and template.trust_remote_code)


def process_device() -> str:
    """This process's GPU (``LOCAL_RANK`` under ``accelerate launch``/``torchrun``), or the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def weight_bytes(model_path: str | os.PathLike, dtype) -> int:
    """Bytes the model's weights take in ``dtype``, from the safetensors headers (no weight is read)."""
    import torch
    from safetensors import safe_open

    count = 0
    for file in Path(model_path).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                shape = fh.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                count += n
    return count * torch.empty((), dtype=dtype).element_size()


def plan_placement(needed: int, free: list[int], tensor_parallel_size: int = 1, local_rank: int = 0
                   ) -> str | dict[int, int]:
    """Where a model of ``needed`` weight bytes goes, given each visible GPU's free bytes: ``"cuda:<rank>"``
    when it fits on this process's GPU and one GPU is asked for, else ``max_memory`` for ``device_map="auto"``
    over the first ``tensor_parallel_size`` GPUs (all of them when one does not fit). An error when the
    GPUs together cannot hold it."""
    if not free:
        raise UserError("no CUDA GPU is visible")
    if tensor_parallel_size > len(free):
        raise UserError(f"--tensor_parallel_size {tensor_parallel_size}: only {len(free)} GPU(s) visible")
    if tensor_parallel_size <= 1 and needed <= FIT_SHARE * free[local_rank]:
        return f"cuda:{local_rank}"
    gpus = list(range(tensor_parallel_size if tensor_parallel_size > 1 else len(free)))
    budget = {g: int(FIT_SHARE * free[g]) for g in gpus}
    if needed > sum(budget.values()):
        raise UserError(f"the model's weights take {needed / 2**30:.1f} GiB; the {len(gpus)} GPU(s) have "
                        f"{sum(budget.values()) / 2**30:.1f} GiB to spare: use more GPUs (--tensor_parallel_size) "
                        "or a smaller dtype")
    return budget


def _free_gpu_bytes() -> list[int]:
    import torch

    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def load_model(model_path: str | os.PathLike, adapter: str | os.PathLike | None = None, *, dtype: str | Any = "auto",
               device: str | None = "auto", trust_remote_code: bool = False, attn_implementation: str | None = None,
               tensor_parallel_size: int = 1, trainable_adapter: bool = False, flag: str = "--model_path",
               quantization: str | None = None):
    """A causal LM from a local folder (safetensors only), with ``adapter`` on top as a ``PeftModel``.

    ``dtype``: a name of :data:`DTYPES` or a torch dtype. ``device``: ``"auto"`` (see the module docstring), a
    device name, or ``None`` (where ``from_pretrained`` puts it; training). The model is in eval mode unless
    ``trainable_adapter`` (the adapter's weights then train). ``quantization``: one of :data:`QUANTIZATIONS`,
    the linear layers' weights quantised while loading (bitsandbytes, on CPU and CUDA)."""
    from transformers import AutoModelForCausalLM

    check_model_folder(model_path, flag)
    if adapter is not None:
        check_adapter_folder(adapter)
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    target = None
    if device == "auto":
        target = process_device()
        if target != "cpu":
            placement = plan_placement(weight_bytes(model_path, torch_dtype), _free_gpu_bytes(), tensor_parallel_size,
                                       int(os.environ.get("LOCAL_RANK", "0")))
            if isinstance(placement, dict):
                logger.info("%s does not fit on one GPU (or --tensor_parallel_size %d): spread over GPUs %s "
                            "(device_map='auto')", model_path, tensor_parallel_size, sorted(placement))
                kwargs.update(device_map="auto", max_memory=placement)
                target = None
            else:
                target = placement
    elif device is not None:
        target = device
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, torch_dtype)
        if target is not None:  # a quantised model is placed while loading; it cannot be moved after
            kwargs["device_map"] = {"": target}
            target = None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except OSError as err:  # e.g. only pickled *.bin weights: we never unpickle a user's files
        raise UserError(f"{flag} {model_path}: cannot load the model: {err}") from None
    if target is not None:
        model = model.to(target)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable_adapter)
    return model if trainable_adapter else model.eval()


QUANTIZATIONS = ("int8", "nf4", "fp4")


def quantization_config(name: str, compute_dtype=None):
    """bitsandbytes' config for ``name``: ``int8`` (LLM.int8, 8-bit weights with outlier columns kept in 16 bits),
    ``nf4`` (4-bit NormalFloat, blocks of 64; QLoRA's and OpenUnlearning's), ``fp4`` (4-bit float,
    ``BitsAndBytesConfig(load_in_4bit=True)``'s default, as Zhang et al. load)."""
    if name not in QUANTIZATIONS:
        raise UserError(f"quantisation must be one of {', '.join(QUANTIZATIONS)}, not {name!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("quantisation needs bitsandbytes: pip install bitsandbytes==0.50.2") from None
    import torch
    from transformers import BitsAndBytesConfig

    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = compute_dtype if isinstance(compute_dtype, torch.dtype) else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=name, bnb_4bit_compute_dtype=compute)


def check_4bit_runs(device: str, name: str = "nf4", flag: str = "--load_in_4bit") -> None:
    """bitsandbytes installed and able to quantise to 4 bits (``nf4`` or ``fp4``) on ``device``: one 64-value
    block quantised there (milliseconds), so that a missing or broken bitsandbytes (no build for this CUDA, a CPU
    it does not support) is one error before any model loads rather than a traceback in the middle of loading."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        raise UserError(f"{flag} needs bitsandbytes: pip install bitsandbytes==0.50.2") from None
    except Exception as err:  # noqa: BLE001 - bitsandbytes raises what its native library's loader raises
        raise UserError(f"{flag}: bitsandbytes cannot be imported here ({type(err).__name__}: {err})") from None
    import torch

    try:
        bnb_functional.quantize_4bit(torch.zeros(64, device=device), quant_type=name)
    except Exception as err:  # noqa: BLE001 - as above: whatever the native kernel raises means "not here"
        raise UserError(f"{flag}: bitsandbytes cannot quantise to 4 bits on {device} here "
                        f"({type(err).__name__}: {err})") from None


def load_tokenizer(model_path: str | os.PathLike, adapter: str | os.PathLike | None = None,
                   trust_remote_code: bool = False):
    """The tokenizer of the adapter folder when it has one, else of the model folder; pad = EOS when it has no
    pad token (as the original scripts)."""
    from transformers import AutoTokenizer

    folder = adapter if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file() else model_path
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, its EOS when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def is_dispatched(model) -> bool:
    """Whether the model is spread over several devices (``device_map``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    devices = set(getattr(base, "hf_device_map", {}).values())
    return len(devices) > 1


def load_for_eval(model_path: str | os.PathLike, adapter: str | os.PathLike | None = None, dtype: str = "auto",
                  trust_remote_code: bool = False, tensor_parallel_size: int = 1):
    """A model (``+ adapter`` as a ``PeftModel``) in eval mode on this process's GPU (or spread over several when
    it does not fit one), else the CPU, and its tokenizer: :mod:`utils.loading`'s one loader and rules."""
    tokenizer = load_tokenizer(model_path, adapter, trust_remote_code)
    model = load_model(model_path, adapter, dtype=dtype, device="auto", trust_remote_code=trust_remote_code,
                       tensor_parallel_size=tensor_parallel_size)
    return model, tokenizer
