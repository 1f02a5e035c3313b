"""The prediction recipe of predict_demo.py and extract_data.py --predict: their generation options, their checks,
and the answers of a model (or a model + adapter) to every question of a file, with a warning when answers ran to
the token budget and one when the chat template adds a system turn that training never saw."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from dataset.reading import QAItem
from evals.generation import BACKENDS, Answers, check_backend, generate
from evals.prompts import build_prompts, unseen_system_prompt
from evals.sampling import GenerationConfig
from utils.chat_template import ChatTemplate, load_chat_template
from utils.cli import bool_arg, family_names, str2bool
from utils.errors import UserError
from utils.files import check_adapter_folder

logger = logging.getLogger(__name__)

__all__ = ["DEMO_MAX_NEW_TOKENS", "PROMPT_FORMATS", "add_generation_args", "budget_warning", "check_prediction_args",
           "generation_config", "predict_answers", "prompt_format", "system_prompt_warning"]

PROMPT_FORMATS = ("chat_template", "tags")
DEMO_MAX_NEW_TOKENS = 64  # demo.py's budget: short facts end well within it


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int = 2048) -> None:
    """Inference options of predict_demo.py and extract_data.py --predict."""
    parser.add_argument("--adapter", help="a PEFT adapter on top of --model_path")
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt_format", default="chat_template", choices=PROMPT_FORMATS,
                       help="chat_template: the tokenizer's own chat template (the competition's inference); "
                            "tags: the --model_family family's tags, as training formats questions")
    group.add_argument("--model_family", "--model_type", dest="model_family", default="qwen2_5",
                       help="model family or alias from config/model_config.yaml (--prompt_format tags formats with "
                            f"its tags; chat_template prompts are compared with them): {family_names()}")
    group.add_argument("--use_chat_template", type=str2bool, nargs="?", const=True, default=None,
                       help=argparse.SUPPRESS)  # earlier spelling: true = chat_template, false = tags
    group.add_argument("--backend", default="auto", choices=BACKENDS,
                       help="inference engine (vllm: merged models only, no --adapter)")
    group.add_argument("--tensor_parallel_size", type=int, default=1, help="GPUs per model (vLLM)")
    group.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vLLM's share of GPU memory")
    group.add_argument("--max_model_len", type=int, default=None, help="vLLM's context length (default: model's)")
    group.add_argument("--max_new_tokens", type=int, default=max_new_tokens,
                       help="longest answer in tokens (an answer that loops runs to it)")
    group.add_argument("--repetition_penalty", type=float, default=None,
                       help="default: the model's generation_config (as the competition's engine; 1 when it has none)")
    group.add_argument("--batch_size", type=int, default=16, help="prompts per batch (transformers backend)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: bfloat16 on a GPU that supports it, float32 on CPU")
    bool_arg(group, "--trust_remote_code", False, "allow the model folder's own Python code to run")


def check_prediction_args(args: argparse.Namespace) -> None:
    """The generation options' mistakes, found before any data or model loads."""
    if args.max_new_tokens < 1:
        raise UserError("--max_new_tokens must be at least 1")
    if args.adapter is not None:
        check_adapter_folder(args.adapter)
        check_backend(args.backend, args.adapter)
    if prompt_format(args) == "tags":
        load_chat_template(args.model_family)


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


def budget_warning(answers: Answers, max_new_tokens: int) -> str | None:
    """The warning for answers that stopped at the token budget without an end-of-answer token (None: none did):
    above the demo's budget they may loop (and cost the whole budget each), at or below it they may be cut short."""
    cut = sum(answers.at_budget)
    if not cut:
        return None
    remedy = (f"they may loop; a smaller --max_new_tokens (the demo uses {DEMO_MAX_NEW_TOKENS}) is faster"
              if max_new_tokens > DEMO_MAX_NEW_TOKENS else
              "they may be cut short (or loop); a larger --max_new_tokens lets longer answers end")
    return (f"{cut} of {len(answers)} answers stopped at --max_new_tokens {max_new_tokens} (no end-of-answer token): "
            f"{remedy}")


def system_prompt_warning(tokenizer, family: ChatTemplate) -> str | None:
    """The warning for a chat template that writes a system turn the family's tags (training's format) do not."""
    system = unseen_system_prompt(tokenizer, family)
    if system is None:
        return None
    shown = system.replace("\n", "\\n")
    shown = shown if len(shown) <= 100 else shown[:97] + "..."
    return (f"the model's chat template puts a system turn before each question (\"{shown}\") that training's "
            f"{family.family} tags (config/model_config.yaml) do not have; --prompt_format tags formats questions "
            "as training did")


def predict_answers(args: argparse.Namespace, items: list[QAItem]) -> list[str]:
    """Answers of ``args.model_path`` (with ``args.adapter`` on top) to every question of ``items`` (in order)."""
    from utils.loading import load_tokenizer, trusts_remote_code

    check_prediction_args(args)
    use_template = prompt_format(args) == "chat_template"
    family = load_chat_template(args.model_family)
    trust = trusts_remote_code(args.trust_remote_code, family)
    tokenizer = load_tokenizer(args.model_path, args.adapter, trust_remote_code=trust) if use_template else None
    if use_template and (warning := system_prompt_warning(tokenizer, family)):
        logger.warning(warning)
    prompts = build_prompts([it.question for it in items], None if use_template else family, tokenizer)
    config = dataclasses.replace(generation_config(args), trust_remote_code=trust)
    answers = generate(args.model_path, prompts, config, backend=args.backend, adapter=args.adapter)
    if warning := budget_warning(answers, args.max_new_tokens):
        logger.warning(warning)
    return [a if a else " " for a in answers]
