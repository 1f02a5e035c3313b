"""TOFU evaluation: forget quality and model utility, with logs interchangeable with TOFU's published ones.

Evaluate a model (a merged model, a base model, or a base model + `--adapter`) on TOFU's four sets:

    python evaluate_tofu.py --model_path /models/tofu_llama2 --model_family llama2-7b \
        --adapter adapter/ME+GD_epoch5_3e-05_maskFalse_0.9/final_lora_model \
        --forget_path tofu/forget10_perturbed.json --retain_path tofu/retain_perturbed.json \
        --real_authors_path tofu/real_authors_perturbed.json --world_facts_path tofu/world_facts_perturbed.json \
        --out results/tofu_me_gd --retain_result logs/retain90_eval_log_aggregated.json

Aggregate two existing logs (names as TOFU's aggregate script):

    python evaluate_tofu.py --aggregate --ckpt_result CKPT.json --retain_result RETAIN.json --save_file OUT.json

Writes `eval_log_aggregated.json` (TOFU's layout) and `aggregate_stat.json` (Model Utility, Forget
Quality and the twelve sub-metrics, by TOFU's names) into `--out` (the earlier `--save_dir`). Forget quality
needs the log of a model trained on the retain split only (`--retain_result`); without it, it is null. The formulas
are in `evals/tofu.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evals.tofu import aggregate
from evals.tofu_cli import add_tofu_set_args, format_table, load_log, run_evaluation, set_paths
from utils.cli import ScriptParser, add_evaluated_model_args, bool_arg, run_cli, setup_logging
from utils.errors import UserError
from utils.files import write_json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ScriptParser(__doc__)
    bool_arg(parser, "--aggregate", False, "only aggregate --ckpt_result (and --retain_result)")
    parser.add_argument("--ckpt_result", help="an eval_log_aggregated.json to aggregate")
    parser.add_argument("--retain_result", help="a retain-only model's eval_log_aggregated.json (forget quality)")
    parser.add_argument("--save_file", help="--aggregate: where to write the result JSON")
    add_evaluated_model_args(parser, family="llama2-7b", required=False)
    parser.add_argument("--out", "--save_dir", dest="out", default="results/tofu",
                        help="folder for the logs (the earlier --save_dir)")
    add_tofu_set_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging()
    if args.aggregate:
        if not args.ckpt_result:
            raise UserError("--aggregate needs --ckpt_result")
        stats = aggregate(load_log(args.ckpt_result, "--ckpt_result"),
                          load_log(args.retain_result, "--retain_result") if args.retain_result else None)
        if args.save_file:
            write_json(args.save_file, stats)
        print(format_table(stats))
        return stats

    from evals.shard import current_shard
    from utils.chat_template import load_chat_template
    from utils.loading import load_for_eval, trusts_remote_code

    if not args.model_path:
        raise UserError("--model_path is required (or --aggregate)")
    template = load_chat_template(args.model_family)
    paths = set_paths(args)
    if args.retain_result:
        load_log(args.retain_result, "--retain_result")
    shard = current_shard()  # under accelerate launch / torchrun: every process takes its share of the batches
    model, tokenizer = load_for_eval(args.model_path, args.adapter, args.dtype,
                                     trusts_remote_code(args.trust_remote_code, template))
    stats = run_evaluation(model, tokenizer, template, paths, Path(args.out), args.retain_result,
                           args.ds_size, args.tofu_batch_size, shard, args.tofu_generation_batch_size)
    if shard.is_main:
        print(format_table(stats))
        print(f"logs written to {args.out}/eval_log_aggregated.json and aggregate_stat.json")
    return stats


if __name__ == "__main__":
    run_cli(main)
