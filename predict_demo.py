"""Greedy answers to every question of a conversation-format JSONL, one `{"text": answer}` line each.

    python predict_demo.py --model_path merged_model/me_gd --data_path data/demo/valid.jsonl \
        --output_path results/me_gd.jsonl --model_type qwen2_5 --tensor_parallel_size 4
    python predict_demo.py --model_path models/smollm2-135m-instruct --adapter RUN/final_lora_model \
        --model_family smollm2 --data_path data/forget/forget.jsonl --output_path results/adapter.jsonl \
        --max_new_tokens 64

Backends: vLLM (tensor-parallel) when it is installed and a GPU is present, else transformers (batched, left
padding; its progress bar shows tokens/s); `--backend` forces one. `--adapter` predicts from a PEFT adapter on top
of `--model_path` without merging (transformers backend; vLLM takes merged models). Prompts go through the model's
own chat template (its default system prompt included), as the competition's inference engine built them;
`--prompt_format tags` builds them as training did instead, from the model family's tags in
config/model_config.yaml (`--model_family`, the seed's `--model_type`, takes a family or an alias such as
`qwen2_5`); a warning says when the chat template adds a system turn those tags do not have.

Greedy, at most `--max_new_tokens` 2,048 new tokens per answer, as the competition. Time grows with the tokens
generated: an answer that never writes its end token (a loop, "the balcony of the balcony ...") runs to the full
budget, minutes per answer on a CPU; a warning after generation counts such answers. For short facts a smaller
budget (the demo uses 64) is much faster. The output file appears only when complete; an empty answer is
written as " ".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dataset.reading import load_qa_jsonl
from evals.predict import add_generation_args, check_prediction_args, predict_answers
from utils.cli import ScriptParser, bool_arg, run_cli, setup_logging
from utils.files import check_model_folder, check_output_free, write_jsonl


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ScriptParser(__doc__)
    parser.add_argument("--model_path", required=True, help="model folder (a merged model, or the original)")
    parser.add_argument("--data_path", required=True, help="conversation-format JSONL with the questions")
    parser.add_argument("--output_path", required=True, help="JSONL of answers, one {'text': ...} a line")
    bool_arg(parser, "--overwrite", False, "replace an existing output file")
    add_generation_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    setup_logging()
    check_model_folder(args.model_path)
    check_prediction_args(args)
    items = load_qa_jsonl(args.data_path)  # fail on bad input before any model loads
    output = check_output_free(args.output_path, args.overwrite, "--output_path")
    answers = predict_answers(args, items)
    write_jsonl(output, [{"text": a} for a in answers])
    print(f"wrote {len(answers)} answers to {output}")
    return output


if __name__ == "__main__":
    run_cli(main)
