"""Did it really forget? Generation, membership inference and memorisation metrics of one (unlearned) model, and
a knowledge check: does the model know the forget facts at all?

    python evaluate_unlearning.py --model_path models/smollm2-135m-instruct --model_family smollm2 \
        --forget data/forget/forget.jsonl --retain data/retain/retain.jsonl --refusals data/idontknow.jsonl \
        --out results/unlearning/smollm2

(`python fetch_model.py` installs models/smollm2-135m-instruct; data/ ships with the repository.) Run it on the
model before unlearning, without `--adapter`: the knowledge check it prints last says whether the model knows
the forget facts (it gives their gold answers a probability of at least 0.5) or whether unlearning has nothing
to remove. Here it says the latter (0 of 96 known, measured): untouched SmolLM2 never saw the demo's fictitious
patients (the tiny demo's target, `python demo.py --model tiny`, memorised them). After unlearning, add
`--adapter` (the `final_lora_model` folder a forget script writes, e.g.
`adapter/ME+GD_epoch5_3e-05_maskFalse_0.9/final_lora_model` for forget_me_gd.py's defaults) and, for the MIA,
`--holdout` and `--retain_only_summary`.

Sets are JSONL in the training format (conversations or question/answer). `--holdout`: items like the forget
items that the model never trained on (the MIA's non-members); `--general`: general-knowledge
questions with reference answers (e.g. the untouched model's own; data/demo/smollm2/general.jsonl holds the
questions only). Writes to `--out`:
`eval_log.json` (every item of every set: answer, ROUGE, refusal, the six MIA scores, EM, ES),
`summary.json` (per-set means; AUC of every MIA score, forget vs holdout; PrivLeak against
`--retain_only_summary`, the summary.json of a model never trained on the forget set; `knowledge_check`, see
`evals.unlearning.knowledge_check`) and `summary.md`.
Definitions and orientation: docs/evaluation.md, "Did it really forget?", and `evals/mia.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from utils.cli import ScriptParser, add_evaluated_model_args, add_evaluation_sets, bool_arg, run_cli, setup_logging
from utils.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ScriptParser(__doc__)
    add_evaluated_model_args(parser, adapter_help="a PEFT adapter on top of --model_path (its Reference score uses "
                                                  "--model_path with the adapter off)")
    parser.add_argument("--reference_model", help="without --adapter: a model folder for the Reference score")
    add_evaluation_sets(parser)
    parser.add_argument("--retain_only_summary", help="summary.json of a model never trained on the forget set "
                                                      "(PrivLeak)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="greedy answer length")
    parser.add_argument("--batch_size", type=int, default=8, help="generation and scoring batch size")
    parser.add_argument("--min_k", type=float, default=0.4, help="k of Min-K%% and Min-K%%++")
    bool_arg(parser, "--count_last_label", False,
             "count each answer's last label (its EOS) in Min-K%%, Min-K%%++, GradNorm, EM and ES (open-unlearning "
             "leaves it out; LOSS, ZLib and Reference always count it)")
    parser.add_argument("--gradnorm_reduction", default="tensor_mean", choices=["tensor_mean", "global"],
                        help="GradNorm over the weight tensors: the mean of their gradient norms (open-unlearning) "
                             "or the norm of the whole gradient")
    parser.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"],
                        help="generation backend (vLLM only without --adapter; auto: vLLM with a CUDA GPU)")
    bool_arg(parser, "--gradnorm", True, "compute the GradNorm score (one backward pass per item)")
    bool_arg(parser, "--overwrite", False, "replace an existing --out folder's results")
    return parser.parse_args(argv)


def read_inputs(args: argparse.Namespace) -> tuple[dict, list[str], dict | None]:
    """Every input file, checked before a model loads."""
    import json

    from dataset.reading import load_lines, load_qa_sets

    sets = load_qa_sets({name: getattr(args, name) for name in ("forget", "retain", "holdout", "general")})
    refusals = load_lines(args.refusals) if args.refusals else []
    retain_only = None
    if args.retain_only_summary:
        try:
            retain_only = json.loads(Path(args.retain_only_summary).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"--retain_only_summary {args.retain_only_summary}: {err}") from None
        if not isinstance(retain_only, dict) or "auc" not in retain_only:
            raise UserError(f"--retain_only_summary {args.retain_only_summary}: no 'auc' field (not a summary.json "
                            "of this script with --holdout)")
    if args.adapter and args.reference_model:
        raise UserError("--reference_model is for models without --adapter (the adapter's base is its reference)")
    if not 0 < args.min_k <= 1:
        raise UserError("--min_k must be in (0, 1]")
    return sets, refusals, retain_only


def main(argv: list[str] | None = None) -> dict:
    from evals.generation import choose_backend, generate, generate_with_model
    from evals.mia import MiaOptions
    from evals.sampling import GenerationConfig
    from evals.shard import current_shard
    from evals.unlearning import (
        adapter_off_reference,
        evaluate_sets,
        format_knowledge_check,
        format_summary,
        knowledge_check,
        reference_nlls,
        summarise,
    )
    from evals.vllm_engine import release_engines
    from utils.chat_template import load_chat_template
    from utils.files import write_json
    from utils.loading import load_for_eval, trusts_remote_code

    args = parse_args(argv)
    setup_logging()
    out = Path(args.out)
    if (out / "summary.json").exists() and not args.overwrite:
        raise UserError(f"{out / 'summary.json'} already exists; pass --overwrite to replace it")
    template = load_chat_template(args.model_family)
    trust = trusts_remote_code(args.trust_remote_code, template)
    sets, refusals, retain_only = read_inputs(args)
    backend = "transformers" if args.adapter else choose_backend(args.backend)
    shard = current_shard()  # under accelerate launch / torchrun: every process takes its share of the batches
    if backend == "vllm" and shard.world > 1:
        raise UserError("--backend vllm runs as one process (its own tensor parallelism): launch with python, "
                        "not accelerate launch, or pass --backend transformers")
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, dtype=args.dtype,
                              trust_remote_code=trust)
    vllm_answers = None
    if backend == "vllm":  # every set's answers from one engine, freed before the model is loaded beside it
        vllm_answers = generate(args.model_path, [template.prompt(q) for pairs in sets.values() for q, _ in pairs],
                                config, backend="vllm")
        release_engines()
    model, tokenizer = load_for_eval(args.model_path, args.adapter, args.dtype, trust)

    def answers(prompts: list[str]) -> list[str]:
        if vllm_answers is not None:
            return vllm_answers
        return generate_with_model(model, tokenizer, prompts, config, shard=shard)

    reference = None
    if args.adapter:
        reference = adapter_off_reference(model, tokenizer, template, args.batch_size, shard)
    elif args.reference_model:
        ref_model, _ = load_for_eval(args.reference_model, None, args.dtype, trust)

        def reference(pairs):
            return reference_nlls(ref_model, tokenizer, template, pairs, args.batch_size, shard=shard)

    log = evaluate_sets(model, tokenizer, template, sets, refusals, answers, reference, args.gradnorm,
                        args.batch_size, MiaOptions(args.min_k, args.count_last_label, args.gradnorm_reduction),
                        shard)
    summary = summarise(log, retain_only)
    summary["model"] = {"model_path": args.model_path, "adapter": args.adapter, "min_k": args.min_k,
                        "count_last_label": args.count_last_label, "gradnorm_reduction": args.gradnorm_reduction}
    # does the model know the forget facts at all? (a model that never did has nothing to unlearn)
    check = knowledge_check(log["forget"], after_unlearning=bool(args.adapter))
    summary["knowledge_check"] = dataclasses.asdict(check)
    if not shard.is_main:  # every process holds the whole log; one writes it
        return summary
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval_log.json", log)
    write_json(out / "summary.json", summary)
    table = format_summary(summary)
    (out / "summary.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"written to {out}/eval_log.json, summary.json, summary.md")
    print(format_knowledge_check(check))
    return summary


if __name__ == "__main__":
    run_cli(main)
