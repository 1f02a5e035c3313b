"""Does the forgetting hold? Relearning, retraining-on-T, quantisation and probing attacks on an unlearned model,
each run on a control that never saw the forget set.

    python evaluate_robustness.py --model_path models/target --adapter runs/ME+GD/final_lora_model \
        --model_family smollm2 --forget forget.jsonl --retain retain.jsonl --holdout holdout.jsonl \
        --control_model models/retain_only --attacks relearn,rtt,quant8,quant4,probe --out results/robustness

Attacks (protocols and sources: docs/evaluation.md, "Does the forgetting hold?"):
`relearn` fine-tunes on the forget set (1 epoch at lr 2e-5, OpenUnlearning's; `--relearn_curve 10,25,50,100`
looks at those steps); `rtt` fine-tunes on k-1 of k disjoint parts of the forget facts and scores the part
left out, over every part (Deeb & Roger); `quant8`, `quant4` load the (merged) model with int8 and 4-bit NF4
weights (bitsandbytes); `probe` asks the forget questions behind a "Sure, here is the answer:" prefix, a
role-play and an instruction-override template, their paraphrases where the data has them
(`paraphrased_question`) and with other forget facts in the prompt. Writes `robustness.json`, `robustness.md`
and `robustness.png` to `--out`. `--original_model` (default: `--model_path` when `--adapter` is given) is
the model before unlearning: the verdicts say how much of it comes back.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from utils.cli import ScriptParser, add_evaluated_model_args, add_evaluation_sets, bool_arg, run_cli, setup_logging
from utils.errors import UserError

logger = logging.getLogger("evaluate_robustness")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from evals.robustness import ATTACKS

    parser = ScriptParser(__doc__)
    add_evaluated_model_args(parser, adapter_help="a PEFT adapter on top of --model_path (merged before any attack)")
    parser.add_argument("--control_model", required=True,
                        help="a model folder that never saw the forget set (e.g. trained on retain only; the same "
                             "tokenizer as --model_path)")
    parser.add_argument("--control_adapter", help="a PEFT adapter on top of --control_model")
    parser.add_argument("--original_model", help="the model before unlearning (default: --model_path with --adapter)")
    parser.add_argument("--reuse_control", help="a robustness.json of an earlier run with the same control, sets and "
                                                "attack settings: its control results (and the original's, when it "
                                                "is the same model) are taken, not recomputed")
    add_evaluation_sets(parser, ("forget", "retain", "holdout", "refusals"))
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of {', '.join(ATTACKS)}")
    parser.add_argument("--out", required=True, help="output folder")
    relearn = parser.add_argument_group("relearning (relearn and rtt)")
    relearn.add_argument("--relearn_lr", type=float, default=2e-5, help="learning rate (constant)")
    relearn.add_argument("--relearn_epochs", type=float, default=1.0, help="epochs over the forget set")
    relearn.add_argument("--relearn_steps", type=int, default=0, help="optimizer steps (> 0: instead of epochs)")
    relearn.add_argument("--relearn_curve", default="",
                         help="comma-separated steps to score on the way (e.g. 10,25,50,100; the last one is the "
                              "attack's length)")
    relearn.add_argument("--relearn_batch_size", type=int, default=4,
                         help="one optimizer step's batch (over all processes under accelerate launch)")
    bool_arg(relearn, "--relearn_lora", False, "relearn a fresh LoRA adapter instead of every weight")
    relearn.add_argument("--rtt_folds", type=int, default=5, help="rtt: parts of the forget facts")
    relearn.add_argument("--rtt_epochs", type=float, default=None, help="rtt: epochs (default --relearn_epochs)")
    probe = parser.add_argument_group("probing")
    probe.add_argument("--leak_threshold", type=float, default=0.5,
                       help="an item leaks when some probe's answer has at least this ROUGE-L recall")
    probe.add_argument("--context_facts", type=int, default=3, help="other forget facts in the in-context probe")
    parser.add_argument("--quant4_type", default="nf4", choices=["nf4", "fp4"],
                        help="quant4's 4-bit type (nf4: OpenUnlearning; fp4: BitsAndBytesConfig's default)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="greedy answer length")
    parser.add_argument("--batch_size", type=int, default=8, help="generation and scoring batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds, the probes and relearning")
    bool_arg(parser, "--overwrite", False, "replace an existing --out folder's results")
    return parser.parse_args(argv)


def read_inputs(args: argparse.Namespace) -> dict:
    """Every input checked before a model loads: the sets, the forget items' paraphrases, the attacks."""
    from dataset.reading import iter_jsonl, load_lines, load_qa_sets
    from evals.robustness import ATTACKS
    from utils.files import check_adapter_folder, check_model_folder

    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise UserError(f"--attacks {args.attacks}: unknown {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(ATTACKS)}")
    sets = load_qa_sets({name: getattr(args, name) for name in ("forget", "retain", "holdout")})
    paraphrases = [obj.get("paraphrased_question") if isinstance(obj, dict) else None
                   for _, obj in iter_jsonl(args.forget)]
    try:
        curve = sorted({int(s) for s in args.relearn_curve.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--relearn_curve {args.relearn_curve}: comma-separated step counts") from None
    if any(s < 1 for s in curve):
        raise UserError("--relearn_curve: steps must be at least 1")
    if "rtt" in attacks and not 2 <= args.rtt_folds <= len(sets["forget"]):
        raise UserError(f"--rtt_folds must be in [2, {len(sets['forget'])}] (the forget items)")
    if not 0 < args.leak_threshold <= 1:
        raise UserError("--leak_threshold must be in (0, 1]")
    check_model_folder(args.control_model, "--control_model")
    if args.control_adapter:
        check_adapter_folder(args.control_adapter, "--control_adapter")
    if args.original_model:
        check_model_folder(args.original_model, "--original_model")
    return {"attacks": attacks, "sets": sets, "paraphrases": paraphrases, "curve": curve,
            "refusals": load_lines(args.refusals) if args.refusals else []}


def control_key(args: argparse.Namespace, inputs: dict) -> str:
    """What the control's results depend on: the control, the sets and every attack setting."""
    settings = {k: v for k, v in vars(args).items()
                if k.startswith(("relearn_", "rtt_", "leak_", "context_", "quant4_", "control_"))
                or k in ("max_new_tokens", "seed", "dtype")}
    blob = json.dumps({"settings": settings, "sets": inputs["sets"], "paraphrases": inputs["paraphrases"],
                       "refusals": inputs["refusals"], "attacks": inputs["attacks"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> dict:
    import tempfile

    from evals.robustness import format_report, plot_report
    from evals.shard import current_shard
    from trainer.relearn import RelearnSettings
    from trainer.robustness import AttackData, AttackSettings, attack_model, build_report, merged_folder
    from utils.chat_template import load_chat_template
    from utils.files import atomic_path, write_json
    from utils.loading import load_tokenizer, trusts_remote_code

    args = parse_args(argv)
    setup_logging()
    out = Path(args.out)
    if (out / "robustness.json").exists() and not args.overwrite:
        raise UserError(f"{out / 'robustness.json'} already exists; pass --overwrite to replace it")
    template = load_chat_template(args.model_family)
    trust = trusts_remote_code(args.trust_remote_code, template)
    inputs = read_inputs(args)
    key = control_key(args, inputs)
    original = args.original_model or (args.model_path if args.adapter else None)
    reused = None
    if args.reuse_control:
        try:
            reused = json.loads(Path(args.reuse_control).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"--reuse_control {args.reuse_control}: {err}") from None
        if not isinstance(reused, dict) or reused.get("control_key") != key:
            raise UserError(f"--reuse_control {args.reuse_control}: made with another control, sets or attack "
                            "settings (its control_key differs); run without it")
    curve = tuple(inputs["curve"])
    steps = curve[-1] if curve else args.relearn_steps
    settings = AttackSettings(
        attacks=tuple(inputs["attacks"]), curve=curve, rtt_folds=args.rtt_folds,
        relearn=RelearnSettings(lr=args.relearn_lr, epochs=args.relearn_epochs, steps=steps,
                                batch_size=args.relearn_batch_size, lora=args.relearn_lora, seed=args.seed),
        rtt=RelearnSettings(lr=args.relearn_lr, epochs=args.rtt_epochs or args.relearn_epochs,
                            steps=args.relearn_steps, batch_size=args.relearn_batch_size, lora=args.relearn_lora,
                            seed=args.seed),
        leak_threshold=args.leak_threshold, context_facts=args.context_facts, quant4_type=args.quant4_type,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, dtype=args.dtype,
        trust_remote_code=trust)
    data = AttackData(inputs["sets"], inputs["refusals"], inputs["paraphrases"])
    shard = current_shard()
    if {"relearn", "rtt"} & set(settings.attacks) and args.relearn_batch_size % shard.world:
        raise UserError(f"--relearn_batch_size {args.relearn_batch_size} does not split over {shard.world} "
                        "processes (it is one step's batch over all of them)")
    tokenizer = load_tokenizer(args.model_path, args.adapter, trust_remote_code=trust)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="robustness-") as tmp:
        folder = merged_folder(args.model_path, args.adapter, args.dtype, trust, Path(tmp) / "model", shard)
        results["model"] = attack_model(folder, "model", tokenizer, template, data, settings, shard)
        if reused is not None:
            logger.info("the control's results are taken from %s", args.reuse_control)
            results["control"] = reused["results"]["control"]
        else:
            control = merged_folder(args.control_model, args.control_adapter, args.dtype, trust, Path(tmp) / "ctl",
                                    shard)
            results["control"] = attack_model(control, "control", tokenizer, template, data, settings, shard)
        shard.barrier()  # the main process's folders go with its temporary directory: every process is done
    if original is not None and reused is not None and reused.get("original") == original:
        results["original"] = reused["results"]["original"]  # the same model on the same sets
    elif original is not None:
        results["original"] = attack_model(Path(original), "original", tokenizer, template, data,
                                           dataclasses.replace(settings, attacks=()), shard)
    report = {"model": {"model_path": args.model_path, "adapter": args.adapter},
              "control": {"model_path": args.control_model, "adapter": args.control_adapter},
              "original": original, "control_key": key,
              **build_report(results["model"], results["control"], results.get("original"), settings.attacks, curve),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")},
              "results": results}
    if not shard.is_main:
        return report
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "robustness.json", report)
    table = format_report(report)
    with atomic_path(out / "robustness.md") as tmp_md:
        tmp_md.write_text(table + "\n", encoding="utf-8")
    with atomic_path(out / "robustness.png") as tmp_png:
        plot_report(report, tmp_png)
    print(table)
    print(f"written to {out}/robustness.json, robustness.md, robustness.png")
    return report


if __name__ == "__main__":
    run_cli(main)
