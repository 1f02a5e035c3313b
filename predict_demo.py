"""Greedy answers to every question of a conversation-format JSONL, one `{"text": answer}` line each.

    python predict_demo.py --model_path merged_model/me_gd --data_path data/demo/valid.jsonl \
        --output_path results/me_gd.jsonl --model_type qwen2_5 --tensor_parallel_size 4

Backends: vLLM (tensor-parallel) when it is installed and a GPU is present, else transformers
(batched, left padding); `--backend` forces one. Prompts go through the model's own chat template (its
default system prompt included), as the competition's inference engine built them; `--prompt_format tags`
builds them as training did instead, from the model family's tags in config/model_config.yaml
(`--model_type` takes a family or an alias such as `qwen2_5`). Greedy, at most 2,048 new tokens, as the
competition. The output file appears only when complete; an empty answer is written as " ".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dataset.data_module import QAItem, load_qa_jsonl
from utils.inference import BACKENDS, GenerationConfig, build_prompts, generate
from utils.utils import (
    UserError,
    bool_arg,
    check_model_folder,
    check_output_free,
    load_chat_template,
    run_cli,
    setup_logging,
    str2bool,
    write_jsonl,
)

PROMPT_FORMATS = ("chat_template", "tags")


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int = 2048) -> None:
    """Inference options shared by predict_demo.py and extract_data.py --predict."""
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt_format", default="chat_template", choices=PROMPT_FORMATS,
                       help="chat_template: the tokenizer's own chat template (the competition's inference); "
                            "tags: the --model_type family's tags, as training formats questions")
    group.add_argument("--model_type", default="qwen2_5",
                       help="model family or alias from config/model_config.yaml (for --prompt_format tags)")
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_path", required=True, help="model folder (a merged model, or the original)")
    parser.add_argument("--data_path", required=True, help="conversation-format JSONL with the questions")
    parser.add_argument("--output_path", required=True, help="JSONL of answers, one {'text': ...} a line")
    bool_arg(parser, "--overwrite", True, "replace an existing output file")
    add_generation_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    setup_logging()
    check_model_folder(args.model_path)
    if prompt_format(args) == "tags":
        load_chat_template(args.model_type)
    items = load_qa_jsonl(args.data_path)  # fail on bad input before any model loads
    output = check_output_free(args.output_path, args.overwrite, "--output_path")
    if args.max_new_tokens < 1:
        raise UserError("--max_new_tokens must be at least 1")
    answers = predict_answers(args, items)
    write_jsonl(output, [{"text": a} for a in answers])
    print(f"wrote {len(answers)} answers to {output}")
    return output


if __name__ == "__main__":
    run_cli(main)
