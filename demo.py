"""The whole pipeline on CPU in one command, on a tiny model that memorised the demo's private facts.

    python demo.py                     # ME+GD (forget_me_gd.py)
    python demo.py --method idk_ap     # IDK+AP (forget_idk_ap.py)

Stages, each through the real scripts (their command lines are printed): build the target model (a
tiny Qwen2 trained from scratch until it has memorised data/demo/train.jsonl; cached) → predict_demo.py
on the training set → extract_data.py (forget/retain from the model's own answers) → forget_me_gd.py
or forget_idk_ap.py → merge.py → predict_demo.py on the validation set for both models → evaluate.py
(the judge is the tiny target model itself: its verdicts are noise, almost always "tie", so the win
rate is ~0 for both) → a before/after table and a PNG with the loss curves and the before/after bars.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
METHODS = {"me_gd": "forget_me_gd.py", "idk_ap": "forget_idk_ap.py"}
METRICS = [("rouge_l_privacy", "privacy ROUGE-L (forget: lower is better)"),
           ("rouge_l_noun", "noun-definition ROUGE-L (keep)"),
           ("choice_acc", "choice accuracy (keep)"),
           ("score", "ATEC score")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--method", default="me_gd", choices=sorted(METHODS), help="unlearning method")
    parser.add_argument("--out", default="runs/demo", help="folder for everything the demo writes")
    parser.add_argument("--train_data", default=str(ROOT / "data/demo/train.jsonl"), help="the target's training set")
    parser.add_argument("--valid_data", default=str(ROOT / "data/demo/valid.jsonl"), help="the validation set")
    parser.add_argument("--idk_data", default=str(ROOT / "data/idontknow.jsonl"), help="refusals for IDK+AP")
    parser.add_argument("--target_epochs", type=int, default=60, help="epochs to memorise the training set")
    parser.add_argument("--num_epochs", type=int, default=None, help="unlearning epochs (default: per method)")
    parser.add_argument("--lr", type=float, default=None, help="unlearning learning rate (default: per method)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the target model even if cached")
    return parser.parse_args(argv)


class Stages:
    """Runs numbered stages, printing one progress line each with its duration."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.time()

    def run(self, title: str, cmd: list[str]) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {title}\n    $ {' '.join(cmd)}", flush=True)
        t0 = time.time()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TQDM_DISABLE": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"stage failed: {title}")
        print(f"    done in {time.time() - t0:.1f}s", flush=True)


def build_target(args: argparse.Namespace, target: Path, stages: Stages) -> None:
    """Train the target model unless a cached one was built from the same data and settings."""
    key = hashlib.sha256(Path(args.train_data).read_bytes() + f"{args.target_epochs}".encode()).hexdigest()[:16]
    stamp = target / "demo_target.json"
    if not args.fresh and stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        stages.done += 1
        print(f"[{stages.done}/{stages.total}] target model: cached at {target}", flush=True)
        return
    stages.run("build the target model (memorise the training set)",
               [sys.executable, "-m", "utils.tiny_model", "--data", args.train_data, "--out", str(target),
                "--epochs", str(args.target_epochs)])
    stamp.write_text(json.dumps({"key": key}))


def plot(run_dir: Path, before: dict, after: dict, png: Path, method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [r["step"] for r in rows]
    for key, label in (("loss", "total"), ("forget_loss", "forget"), ("retain_loss", "retain")):
        ax1.plot(steps, [r[key] for r in rows], label=label)
    ax1.set(title=f"training losses ({method})", xlabel="optimizer step", ylabel="loss")
    ax1.legend()
    names = [m for m, _ in METRICS]
    x = range(len(names))
    ax2.bar([i - 0.2 for i in x], [before[m] or 0 for m in names], width=0.4, label="target (before)")
    ax2.bar([i + 0.2 for i in x], [after[m] or 0 for m in names], width=0.4, label="unlearned (after)")
    ax2.set_xticks(list(x), ["privacy\nROUGE-L", "noun\nROUGE-L", "choice\naccuracy", "ATEC\nscore"])
    ax2.set(title="validation metrics", ylim=(0, 1.3))
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    target, results = out / "target", out / "results"
    stages = Stages(total=10)
    started = time.time()

    build_target(args, target, stages)
    stages.run("predict the training set with the target model",
               [py, "predict_demo.py", "--model_path", str(target), "--data_path", args.train_data,
                "--output_path", str(results / "train_pred.jsonl"), "--model_type", "tiny",
                "--max_new_tokens", "64", "--backend", "transformers"])
    stages.run("choose forget/retain items from its answers",
               [py, "extract_data.py", "--test_data", args.train_data, "--user_out_path",
                str(results / "train_pred.jsonl"), "--forget_out_path", str(out / "data/forget.jsonl"),
                "--retain_out_path", str(out / "data/retain.jsonl"), "--keep_prefixes", "noun_definition",
                "choice", "qa", "--keep_threshold", "1.0"])
    defaults = {"me_gd": ("5", "2e-3"), "idk_ap": ("10", "2e-3")}[args.method]
    epochs, lr = str(args.num_epochs or defaults[0]), str(args.lr or defaults[1])
    run_dir = out / "adapter" / args.method
    train_cmd = [py, METHODS[args.method], "--model_path", str(target), "--model_family", "tiny",
                 "--forget_data_path", str(out / "data/forget.jsonl"), "--retain_data_path",
                 str(out / "data/retain.jsonl"), "--idk_data_path", args.idk_data, "--num_epochs", epochs,
                 "--bs", "4", "--lr", lr, "--output_dir", str(run_dir), "--overwrite"]
    if args.method == "idk_ap":
        train_cmd += ["--forget_coeff", "1.0"]
    stages.run(f"unlearn with {METHODS[args.method]}", train_cmd)
    merged = out / "merged_model" / args.method
    stages.run("merge the adapter", [py, "merge.py", "--base_model", str(target), "--adapter",
                                     str(run_dir / "final_lora_model"), "--output", str(merged), "--overwrite"])
    for name, model in (("original", target), ("unlearned", merged)):
        stages.run(f"predict the validation set with the {name} model",
                   [py, "predict_demo.py", "--model_path", str(model), "--data_path", args.valid_data,
                    "--output_path", str(results / f"{name}.jsonl"), "--model_type", "tiny",
                    "--max_new_tokens", "64", "--backend", "transformers"])
    scores = {}
    for name in ("original", "unlearned"):
        stages.run(f"score the {name} model (judge: the tiny target model, its verdicts are noise)",
                   [py, "evaluate.py", "--model_name", str(target), "--test_data", args.valid_data,
                    "--user_out_path", str(results / f"{name}.jsonl"), "--we_out_path",
                    str(results / "original.jsonl"), "--out_path", str(out / "scores" / f"{name}.jsonl"),
                    "--backend", "transformers", "--judge_max_tokens", "16"])
        scores[name] = json.loads((out / "scores" / f"{name}.jsonl").read_text())

    before, after = scores["original"], scores["unlearned"]
    png = out / f"demo_{args.method}.png"
    plot(run_dir, before, after, png, args.method)
    print(f"\n{'metric':<44}{'before':>8}{'after':>8}")
    for key, label in METRICS:
        print(f"{label:<44}{before[key]:>8.3f}{after[key]:>8.3f}")
    judge = after["judge"]
    print(f"judge (tiny target model, noise): {judge['win']} win / {judge['tie']} tie / {judge['loss']} loss")
    elapsed = time.time() - started
    print(f"\nplot: {png}\ntotal time: {elapsed:.0f}s")
    summary = {"method": args.method, "before": before, "after": after, "png": str(png), "seconds": elapsed}
    (out / f"demo_{args.method}.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    main()
