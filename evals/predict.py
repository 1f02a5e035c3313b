"""The prediction recipe of predict_demo.py and extract_data.py --predict: their generation options and the
answers of a model to every question of a file."""

from __future__ import annotations

import argparse
import dataclasses

from dataset.reading import QAItem
from evals.generation import BACKENDS, generate
from evals.prompts import build_prompts
from evals.sampling import GenerationConfig
from utils.chat_template import load_chat_template
from utils.cli import bool_arg, family_names, str2bool

__all__ = ["PROMPT_FORMATS", "add_generation_args", "generation_config", "predict_answers", "prompt_format"]

PROMPT_FORMATS = ("chat_template", "tags")


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int = 2048) -> None:
    """Inference options of predict_demo.py and extract_data.py --predict."""
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt_format", default="chat_template", choices=PROMPT_FORMATS,
                       help="chat_template: the tokenizer's own chat template (the competition's inference); "
                            "tags: the --model_family family's tags, as training formats questions")
    group.add_argument("--model_family", "--model_type", dest="model_family", default="qwen2_5",
                       help=f"model family or alias from config/model_config.yaml (for --prompt_format tags): "
                            f"{family_names()}")
    group.add_argument("--use_chat_template", type=str2bool, nargs="?", const=True, default=None,
                       help=argparse.SUPPRESS)  # earlier spelling: true = chat_template, false = tags
    group.add_argument("--backend", default="auto", choices=BACKENDS, help="inference engine")
    group.add_argument("--tensor_parallel_size", type=int, default=1, help="GPUs per model (vLLM)")
    group.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vLLM's share of GPU memory")
    group.add_argument("--max_model_len", type=int, default=None, help="vLLM's context length (default: model's)")
    group.add_argument("--max_new_tokens", type=int, default=max_new_tokens, help="longest answer in tokens")
    group.add_argument("--repetition_penalty", type=float, default=None,
                       help="default: the model's generation_config (as the competition's engine; 1 when it has none)")
    group.add_argument("--batch_size", type=int, default=16, help="prompts per batch (transformers backend)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: bfloat16 on a GPU that supports it, float32 on CPU")
    bool_arg(group, "--trust_remote_code", False, "allow the model folder's own Python code to run")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            repetition_penalty=args.repetition_penalty, tensor_parallel_size=args.tensor_parallel_size,
                            gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                            dtype=args.dtype, trust_remote_code=args.trust_remote_code)


def prompt_format(args: argparse.Namespace) -> str:
    """``--prompt_format``, with the earlier ``--use_chat_template true|false`` taking precedence when given."""
    if args.use_chat_template is not None:
        return "chat_template" if args.use_chat_template else "tags"
    return args.prompt_format


def predict_answers(args: argparse.Namespace, items: list[QAItem]) -> list[str]:
    """Answers of ``args.model_path`` to every question of ``items`` (in order)."""
    from utils.loading import load_tokenizer, trusts_remote_code

    use_template = prompt_format(args) == "chat_template"
    family = load_chat_template(args.model_family)
    trust = trusts_remote_code(args.trust_remote_code, family)
    tokenizer = load_tokenizer(args.model_path, trust_remote_code=trust) if use_template else None
    prompts = build_prompts([it.question for it in items], None if use_template else family, tokenizer)
    config = dataclasses.replace(generation_config(args), trust_remote_code=trust)
    answers = generate(args.model_path, prompts, config, backend=args.backend)
    return [a if a else " " for a in answers]
