"""Does the forgetting hold on a real model? The robustness attacks on the leaderboard's SmolLM2 methods.

    python bench/leaderboard.py --methods ME+GD IDK+AP NPO+GD RMU      # once: target, control, adapters
    python bench/robustness.py                                         # writes bench/robustness.md

Each method's first-seed adapter of the leaderboard (`runs/leaderboard/runs/<method>_seed1001`) is merged into
the leaderboard's target and attacked as `evaluate_robustness.py` does; the retain-only model (never saw the
forget facts) is the control, attacked once; the target before unlearning is the original. Results are cached
per model in `--workdir/robustness/` (delete a folder to redo it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["ME+GD", "IDK+AP", "NPO+GD", "RMU"]
READING = (
    "Reading it (measured 2026-12-01 at the defaults): R near 0 means the forget answers come back far faster than "
    "the control learns them, i.e. they were hidden; the control's own level (0.69: the facts repeat the person's "
    "name from the question, so a model that never saw them scores well above 0) is the floor to compare with, "
    "not 0. The probe leak rate counts ROUGE-L recall >= 0.5, which the control reaches on every item for the same "
    "reason: compare the worst-case recall in the verdicts with the control's. An rtt recovery below 0 means the "
    "held-out facts stay below the control's level. Quantisation brings knowledge back only when unlearning's "
    "updates stay inside the 4-bit buckets (Zhang et al.: lr ~1e-5); bench/leaderboard.md gives each adapter's "
    "learning rate.")
FAMILY = "smollm2"
FIRST_SEED = 1001  # bench/leaderboard.py's first test-split seed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from evals.robustness import ATTACKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, help="leaderboard runs to attack")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "leaderboard"), help="the leaderboard's workdir")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attacks")
    parser.add_argument("--relearn_lr", type=float, default=2e-5, help="relearning learning rate")
    parser.add_argument("--relearn_steps", type=int, default=0, help="relearning steps (0: --relearn_epochs)")
    parser.add_argument("--relearn_epochs", type=float, default=1.0, help="relearning epochs")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="greedy answer length (the leaderboard's)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "robustness.md"), help="the table")
    return parser.parse_args(argv)


def cached(path: Path, compute) -> dict:
    from utils.files import write_json

    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    write_json(path, result)
    return result


def attack_runs(work: Path, adapters: dict[str, Path], attacks: tuple[str, ...], relearn_lr: float = 2e-5,
                relearn_steps: int = 0, relearn_epochs: float = 1.0, max_new_tokens: int = 48) -> dict:
    """The control's, the original's and each method's attack results on the leaderboard's workdir, cached in
    ``work/robustness/<settings>/``; ``adapters``: method -> its adapter on the target; per method its report
    (:func:`trainer.robustness.build_report`)."""
    from dataset.reading import load_lines, load_qa_sets
    from trainer.relearn import RelearnSettings
    from trainer.robustness import AttackData, AttackSettings, attack_model, build_report, merged_folder
    from utils.chat_template import load_chat_template
    from utils.loading import load_tokenizer

    target, control = work / "target", work / "retain_only"
    sets = load_qa_sets({name: work / f"{name}.jsonl" for name in ("forget", "retain", "holdout")})
    data = AttackData(sets, load_lines(work / "idk.txt"), [None] * len(sets["forget"]))
    relearn = RelearnSettings(lr=relearn_lr, epochs=relearn_epochs, steps=relearn_steps)
    settings = AttackSettings(attacks=attacks, relearn=relearn, rtt=relearn, max_new_tokens=max_new_tokens,
                              dtype="float32")
    template = load_chat_template(FAMILY)
    tokenizer = load_tokenizer(target)
    cache = work / "robustness" / f"lr{relearn_lr}_s{relearn_steps}_e{relearn_epochs}_t{max_new_tokens}"
    out: dict = {"control": cached(cache / f"control_{'-'.join(attacks)}.json", lambda: attack_model(
        control, "control", tokenizer, template, data, settings))}
    out["original"] = cached(cache / "original.json", lambda: attack_model(
        target, "original", tokenizer, template, data, dataclasses.replace(settings, attacks=())))
    out["methods"] = {}
    for method, adapter in adapters.items():

        def compute(adapter=adapter):
            with tempfile.TemporaryDirectory(prefix="robustness-") as tmp:
                folder = merged_folder(target, adapter, "float32", False, Path(tmp) / "model")
                return attack_model(folder, "model", tokenizer, template, data, settings)

        res = cached(cache / f"{Path(adapter).parent.name}_{'-'.join(attacks)}.json", compute)
        out["methods"][method] = {"report": build_report(res, out["control"], out["original"], attacks),
                                  "results": res}
    return out


def main(argv: list[str] | None = None) -> str:
    import torch

    from evals.robustness import HEADLINE, KNOWLEDGE
    from utils.cli import setup_logging

    args = parse_args(argv)
    setup_logging()
    work = Path(args.workdir)
    if not (work / "target" / "config.json").is_file():
        raise SystemExit(f"error: {work / 'target'} missing; run python bench/leaderboard.py first")
    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    attacks = tuple(a for a in args.attacks.split(",") if a)
    adapters = {m: work / "runs" / f"{m}_seed{FIRST_SEED}" / "final_lora_model" for m in args.methods}
    missing = [m for m, a in adapters.items() if not a.is_dir()]
    if missing:
        raise SystemExit(f"error: no leaderboard adapter for {', '.join(missing)} in {work / 'runs'}; run "
                         f"python bench/leaderboard.py --methods {' '.join(missing)} first")
    runs = attack_runs(work, adapters, attacks, args.relearn_lr, args.relearn_steps, args.relearn_epochs,
                       args.max_new_tokens)
    control_res, original = runs["control"], runs["original"]
    reports = {m: (r["report"], r["results"]) for m, r in runs["methods"].items()}

    def f(x):
        return "-" if x is None else f"{x:.2f}"

    what = KNOWLEDGE[HEADLINE]
    lines = ["# Does the forgetting hold? Robustness attacks on SmolLM2-135M-Instruct", "",
             f"Command: `python bench/robustness.py --relearn_lr {args.relearn_lr} --relearn_steps "
             f"{args.relearn_steps} --relearn_epochs {args.relearn_epochs}` ({threads} CPU threads, "
             f"{time.strftime('%Y-%m-%d')}). The leaderboard's target, its first-seed adapters (each method's "
             "chosen settings: bench/leaderboard.md) and retain-only control; protocols: docs/evaluation.md, "
             "\"Does the forgetting hold?\".", "",
             f"Each cell: {what} of the model after the attack, the control's after the same attack in brackets, "
             "then R (relearning) or Q (quantisation); probe: the leak rate (any probe's ROUGE-L recall >= 0.5), "
             "the control's in brackets. Before any attack: the original (target) scores "
             f"{f(original['baseline'][HEADLINE])}, the control {f(control_res['baseline'][HEADLINE])}.", "",
             "| method | before | " + " | ".join(attacks) + " | minutes |",
             "|" + " --- |" * (len(attacks) + 3)]
    for method, (report, res) in reports.items():
        cells = []
        for attack in attacks:
            entry = report["attacks"][attack]
            if attack == "probe":
                cells.append(f"{f(entry['model']['leak_rate'])} ({f(entry['control']['leak_rate'])})")
            else:
                score = entry.get("R", entry.get("Q"))[HEADLINE]
                name = "R" if "R" in entry else "Q"
                cells.append(f"{f(entry['model'][HEADLINE])} ({f(entry['control'][HEADLINE])}), {name} {f(score)}")
        minutes = sum(res["minutes"].values())
        lines.append(f"| {method} | {f(report['baseline']['model'][HEADLINE])} | " + " | ".join(cells)
                     + f" | {minutes:.1f} |")
    lines += ["", f"Control: {sum(control_res['minutes'].values()):.1f} minutes (once for all methods); "
              f"original: {sum(original['minutes'].values()):.1f}.", "", READING, ""]
    for method, (report, _) in reports.items():
        lines += [f"- {method}: " + "; ".join(e["verdict"] for e in report["attacks"].values())]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return text


if __name__ == "__main__":
    main()
