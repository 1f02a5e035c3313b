"""The method leaderboard on a real model: every unlearning method tuned with the same trial budget on a
validation split, then reported on a disjoint test split over several seeds (mean ± 95 % interval).

    python fetch_model.py smollm2-135m-instruct        # once
    python bench/leaderboard.py                         # 2-5 h on 2 CPU cores (10-27 min a method); resumable
    python bench/leaderboard.py --methods ME+GD NPO+GD  # a subset (the others stay in the results file)
    python bench/leaderboard.py --trials 0 --epochs 10 --lr 1e-3 --results runs/single.json   # one budget for all

The target is SmolLM2-135M-Instruct fully fine-tuned until it has memorised 24 private facts to forget (12 for
tuning: the **validation** split; 12 reported: the **test** split, the ``forget`` set) and 12 to keep (plus its
own answers to 8 everyday questions, so it keeps its voice); 24 more facts of the same kind are never trained
(each split's holdout: MIA non-members). A retain-only model is trained the same way on the validation and retain
facts, never the test ones: the test split's PrivLeak reference and the attacks' control.

Per method (bench/tune.py's search spaces and objective, fixed in advance): ``--trials`` Optuna trials (seeded
TPE) unlearn the validation split, each scored there by the harmonic mean of forget efficacy, privacy and utility
with the 20 % utility filter; the best trial's settings then unlearn the test split with ``--seeds`` seeds, each
scored by ``evals/unlearning.py`` (ROUGE-L F of greedy answers on forget and retain facts against their gold
answers and on 20 general-knowledge questions against the untouched SmolLM2's answers, the LOSS and Min-K%++ MIA
AUCs, PrivLeak against the retain-only model, ES, refusals) and by the same objective; the first seed's model is
attacked (``--attacks``, bench/robustness.py's). ``--trials 0`` skips tuning: every method runs ``--epochs`` at
``--lr`` with retain weight 1 (the single-budget table).

Resumable across machines: each finished method is written at once to ``--results`` (committed beside the table),
and a later run skips the methods it holds for the same budget; models, studies and evaluations are cached in
``--workdir``. A results file of another budget is refused (pass another ``--results``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    parser.add_argument("--trials", type=int, default=3,
                        help="Optuna trials per method on the validation split, the same for every method "
                             "(at 3, 10-27 min a method on 2 CPU cores, mostly evaluation and attacks; up to 3 "
                             "they are seeded TPE's random start-up trials); 0: no tuning, --epochs at --lr for all")
    parser.add_argument("--seeds", type=int, default=3, help="test-split runs of each method's chosen settings")
    parser.add_argument("--lr_range", default="1e-4,5e-3", help="tuning: learning rate, log-uniform between these")
    parser.add_argument("--epochs_range", default="3,10", help="tuning: epochs, an integer between these")
    parser.add_argument("--seed", type=int, default=0, help="the samplers' seed")
    parser.add_argument("--epochs", type=int, default=10, help="--trials 0: unlearning epochs (3 steps each)")
    parser.add_argument("--lr", type=float, default=1e-3, help="--trials 0: unlearning learning rate, every method")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "leaderboard"),
                        help="models, studies, runs and evaluations (reused when present)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "leaderboard_runs.json"),
                        help="every finished method's numbers (committed: a later run skips what it holds)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "leaderboard.md"), help="the table (the PNG beside it)")
    parser.add_argument("--attacks", default="relearn,quant4,probe",
                        help="post-attack columns on the first seed (bench/robustness.py's attacks, its defaults; "
                             "'' for none)")
    return parser.parse_args(argv)


# facts of one kind (privacy_items(60, seed=11)); the first 36 are the single-budget table's forget/retain/holdout
SPLITS = {"forget": (0, 12), "retain": (12, 24), "holdout": (24, 36), "val": (36, 48), "holdout_val": (48, 60)}
FIRST_SEED = 1001


def build_data(work: Path, base: Path) -> dict:
    """The splits of :data:`SPLITS`, general questions with the untouched model's answers (cached)."""
    from evals.generation import generate_with_model
    from evals.sampling import GenerationConfig
    from utils.chat_template import load_chat_template
    from utils.files import write_jsonl
    from utils.loading import load_for_eval
    from zoo.demo_data import GENERAL, REFUSALS, pairs_of, privacy_items

    facts = privacy_items(60, seed=11)
    sets = {name: facts[lo:hi] for name, (lo, hi) in SPLITS.items()}
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
    """The memorised target (both forget splits + retain facts) and the retain-only model (the validation split
    and the retain facts: never the test split), trained the same way."""
    from zoo.demo_data import REPLAY
    from zoo.target import build_memorised_model

    made = []
    schedule = {"epochs": 10, "lr": 5e-4, "replay_tokens": 24}
    for name, pairs in (("target", data["forget"] + data["retain"] + data["val"]),
                        ("retain_only", data["retain"] + data["val"])):
        path = work / name
        recipe = {"base": str(base), "family": FAMILY, "pairs": [list(p) for p in pairs],
                  "replay": REPLAY[:8], **schedule}
        if not reusable(path, recipe):
            # everything measured on the old models goes with them
            for derived in ("eval", "robustness", "runs", "trials"):
                shutil.rmtree(work / derived, ignore_errors=True)
            (work / "studies.db").unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
            build_memorised_model(base, path, list(pairs), FAMILY, replay=REPLAY[:8], **schedule)
            (path / RECIPE).write_text(json.dumps(recipe), encoding="utf-8")  # last: the model is complete
        made.append(path)
    return made[0], made[1]


RECIPE = "leaderboard_recipe.json"


def reusable(path: Path, recipe: dict) -> bool:
    """Whether the model in ``path`` was trained by ``recipe`` (the facts, base and schedule). A folder without the
    stamp (made before models were stamped) is taken as it is and stamped; one stamped otherwise is rebuilt."""
    if not (path / "config.json").is_file():
        return False
    stamp = path / RECIPE
    if not stamp.is_file():
        stamp.write_text(json.dumps(recipe), encoding="utf-8")
        return True
    return json.loads(stamp.read_text(encoding="utf-8")) == recipe


def drop_stale(work: Path, run_name: str) -> None:
    """Forget what was measured on an earlier ``run_name`` before it is trained again with other settings: its
    evaluation and its attack results (cached by the run's name alone)."""
    shutil.rmtree(work / "eval" / run_name, ignore_errors=True)
    for cached in (work / "robustness").glob(f"*/{run_name}_*.json"):
        cached.unlink()


def evaluate(model_path: Path, adapter: Path | None, data: dict, refusals: list[str], out: Path,
             retain_only: dict | None = None) -> dict:
    """Evaluate one model on the forget, retain, holdout and general sets (cached in ``out/summary.json``); the
    summary's ``quick`` holds :func:`evals.robustness.metrics_of` its log (the tuning objective's inputs)."""
    from evals.generation import generate_with_model
    from evals.robustness import metrics_of
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
    sets = {name: data[name] for name in ("forget", "retain", "holdout", "general")}
    log = evaluate_sets(model, tokenizer, template, sets, refusals, generate, reference)
    summary = summarise(log, retain_only)
    summary["quick"] = {k: v for k, v in metrics_of(log).items() if v is not None}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval_log.json", log)
    write_json(out / "summary.json", summary)
    return summary


def budget_of(args: argparse.Namespace) -> dict:
    """What makes two runs' numbers comparable: a results file holds one budget."""
    if args.trials == 0:
        return {"trials": 0, "epochs": args.epochs, "lr": args.lr, "seeds": args.seeds, "attacks": args.attacks}
    return {"trials": args.trials, "seeds": args.seeds, "lr_range": args.lr_range, "epochs_range": args.epochs_range,
            "seed": args.seed, "attacks": args.attacks}


def load_results(path: Path, budget: dict) -> dict:
    """The results file (``{"budget", "target", "control", "methods"}``), empty when absent; another budget's file
    is refused."""
    if not path.is_file():
        return {"budget": budget, "methods": {}}
    results = json.loads(path.read_text(encoding="utf-8"))
    if results.get("budget") != budget:
        raise SystemExit(f"error: {path} holds the results of another budget ({results.get('budget')}, this run: "
                         f"{budget}); pass --results NEW_FILE or delete it")
    return results


def save_results(path: Path, results: dict) -> None:
    from utils.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def run_method(world: dict, method: str, args: argparse.Namespace, data: dict, refusals: list[str],
               control_summary: dict, start: dict) -> dict:
    """One method's entry: its trials and chosen settings (or the single budget), and its test-split seeds."""
    from bench import tune

    if args.trials:
        study = tune.tune(world, method, args, start)
        settings, best = tune.chosen_settings(study)
        trials = [dict(t.user_attrs, number=t.number, params=t.params) for t in tune.finished(study)]
        chosen, val_score = dict(best.user_attrs, number=best.number), best.value
    else:
        settings = {"lr": args.lr, "regularization_coeff": 1.0, "num_epochs": args.epochs}
        trials, chosen, val_score = [], None, None
    work, seeds, summaries = world["work"], [], []
    for k in range(args.seeds):
        seed = FIRST_SEED + k
        run = work / "runs" / f"{method}_seed{seed}"  # the folder name keys bench/robustness.py's cache
        final = run / "final_lora_model"
        stamp = run / "settings.json"
        if not (final.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == settings):
            drop_stale(work, run.name)
            begin = time.perf_counter()
            tune.unlearn(world, method, settings, "forget", run, seed)
            (run / "minutes.txt").write_text(f"{(time.perf_counter() - begin) / 60:.3f}")
            stamp.write_text(json.dumps(settings))  # last: the run is complete
        minutes = float((run / "minutes.txt").read_text())
        summary = evaluate(world["target"], final, data, refusals, work / "eval" / f"{method}_seed{seed}",
                           control_summary)
        summaries.append(summary)
        seeds.append({"seed": seed, "row": row(method, summary, minutes),
                      "parts": tune.objective_score(summary["quick"], start), "minutes": minutes})
    attacked = None
    attacks = tuple(a for a in args.attacks.split(",") if a)
    if attacks:
        from bench.robustness import attack_runs

        first = work / "runs" / f"{method}_seed{FIRST_SEED}" / "final_lora_model"
        attacked = attack_runs(work, {method: first}, attacks)["methods"][method]["results"]
        seeds[0]["row"] = row(method, summaries[0], seeds[0]["minutes"], attacked)
    minutes = sum(t["minutes"] for t in trials) + sum(r["minutes"] for r in seeds)
    return {"settings": settings, "val_score": val_score, "trials": trials, "chosen": chosen, "seeds": seeds,
            "minutes": minutes}


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


COLUMNS = (("forget", "forget ROUGE", "{:.3f}"), ("retain", "retain ROUGE", "{:.3f}"),
           ("general", "general ROUGE", "{:.3f}"), ("auc_loss", "AUC LOSS", "{:.3f}"),
           ("auc_mkpp", "AUC Min-K%++", "{:.3f}"), ("priv_leak", "PrivLeak %", "{:+.1f}"), ("es", "ES", "{:.3f}"),
           ("refusal", "refusals", "{:.2f}"))
ATTACK_COLUMNS = (("relearn", "relearn", "{:.3f}"), ("quant4", "quant4", "{:.3f}"), ("probe", "probe leak", "{:.2f}"))


def cell(values: list, fmt: str) -> str:
    """One value, or the mean ± the 95 % t half-width of several ('-' when missing)."""
    from bench.tune import interval

    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    mean, half = interval(values)
    return f"{fmt.format(mean)} ± {fmt.format(half).lstrip('+')}"


def ranking(methods: dict) -> list[tuple[str, float, float]]:
    """(method, mean test score, 95 % half-width), best first."""
    from bench.tune import rank

    return rank({method: [r["parts"]["score"] for r in e["seeds"]] for method, e in methods.items()})


def table(results: dict, threads: int, png_name: str = "leaderboard.png") -> str:
    """The markdown table of a results file: the target and the retain-only model, then the methods by test score."""
    from bench import tune

    budget, methods = results["budget"], results["methods"]
    seeds = budget["seeds"]
    if budget["trials"]:
        how = (f"every method tuned with the same budget, {budget['trials']} Optuna trials (seeded TPE) over its own "
               f"search space (bench/tune.py: lr log-uniform {budget['lr_range']}, retain weight 0.5-5, epochs "
               f"{budget['epochs_range']}, the method's own knobs) on the validation split (12 facts), each scored by "
               "the objective fixed in advance: the harmonic mean of forget efficacy (1 - answer probability), "
               "privacy (1 - 2 |AUC_LOSS - 0.5|) and utility (retain probability / the target's), 0 below 80 % "
               "utility; the best trial's settings then unlearn the disjoint test split (12 facts)"
               + ("; with 3 trials or fewer every trial is one of seeded TPE's random start-up points (an equal "
                  "random search: the first candidate is the same for every method, and methods with the same "
                  "search space got the same three)" if budget["trials"] <= 3 else ""))
    else:
        how = (f"one budget for every method, {budget['epochs']} epochs at lr {budget['lr']}, retain weight 1, "
               "each method's default hyper-parameters (nothing tuned)")
    attacks = [c for c in ATTACK_COLUMNS if c[0] in budget["attacks"].split(",")]
    command = "" if budget["trials"] else f" --trials 0 --epochs {budget['epochs']} --lr {budget['lr']}"
    lines = [
        "# Unlearning methods on a real model (SmolLM2-135M-Instruct)", "",
        f"Command: `python bench/leaderboard.py{command}` ({threads} CPU threads; results in the `--results` file, "
        f"updated {time.strftime('%Y-%m-%d')}). Setup and definitions: the script's docstring, docs/evaluation.md "
        "(\"Did it really forget?\") and docs/benchmarks.md.", "",
        f"Budget: {how}; bs 4, LoRA r 16, forget coefficient 1.0, `--mask true`. Test-split numbers over {seeds} "
        f"seeds: mean ± 95 % t interval; the attack columns are the first seed's model.", "",
        "Columns: test score: the objective on the test split; ROUGE-L F of greedy answers against the gold answers "
        "(forget: lower is better; retain: higher), general: against the untouched model's answers (higher); "
        "AUC: forget vs holdout facts, 0.5 = indistinguishable from never-seen facts (the goal), 1 = still "
        "detectable, < 0.5 = over-unlearned; PrivLeak (MUSE's, on the LOSS AUC): ((1 − AUC) − (1 − AUC of the "
        "retain-only model)) / (1 − that AUC) x 100: 0 ideal, strongly negative = still detectable (a model that "
        "knows the facts scores about −100), positive = over-unlearning; ES: extraction strength on forget facts "
        "(1/n at best); refusals: share of forget answers that are refusals. After attacks (bench/robustness.py): "
        "forget ROUGE after relearning on the forget facts (1 epoch, lr 2e-5) and with 4-bit NF4 weights, and the "
        "probe leak rate (share of forget facts some probe recovers, ROUGE-L recall >= 0.5); the retain-only row "
        "is the control. minutes: one training run (mean over the seeds) / the method's whole budget (trials, "
        "seeds, their evaluations excluded).", "",
        "| method | chosen settings | val score | test score | " + " | ".join(c[1] for c in COLUMNS + tuple(attacks))
        + " | minutes |",
        "| " + " | ".join(["---"] * (5 + len(COLUMNS) + len(attacks))) + " |",
    ]
    for name in ("target", "control"):
        r = results.get(name)
        if r:
            label = "(target, before)" if name == "target" else "(retain-only model)"
            lines.append(f"| {label} | - | - | - | " + " | ".join(cell([r.get(k)], f) for k, _, f in COLUMNS
                                                                + tuple(attacks)) + " | - |")
    ranked = ranking(methods)
    for method, _, _ in ranked:
        e = methods[method]
        rows = [s["row"] for s in e["seeds"]]
        val = "-" if e["val_score"] is None else f"{e['val_score']:.3f}"
        test = cell([s["parts"]["score"] for s in e["seeds"]], "{:.3f}")
        lines.append(f"| {method} | {tune.settings_text(e['settings'])} | {val} | {test} | "
                     + " | ".join(cell([r.get(k) for r in rows], f) for k, _, f in COLUMNS)
                     + "".join(f" | {cell([rows[0].get(k)], f)}" for k, _, f in attacks)
                     + f" | {sum(s['minutes'] for s in e['seeds']) / len(rows):.1f} / {e['minutes']:.0f} |")
    close = tune.overlaps(ranked)
    missing = [m for m in METHODS if m not in methods]
    lines += ["", "Within noise (neighbours by test score whose 95 % intervals overlap): " + (", ".join(close) or
                                                                                           "none")]
    other = other_builds(results)
    if other:
        lines += ["", "Measured on another build of the target (the same recipe trained on another machine, whose "
                      "arithmetic differs in the last bits; a results file resumed on a new machine mixes builds): "
                  + "; ".join(f"{', '.join(names)} (that build's own row: forget ROUGE {r['forget']:.3f}, retain "
                              f"{r['retain']:.3f}, general {r['general']:.3f}, ES {r['es']:.3f})"
                              for names, r in other) + "."]
    if missing:
        lines += ["", f"Not yet run (`python bench/leaderboard.py` resumes): {', '.join(missing)}."]
    lines += [
        "",
        "Reading it: the retain-only model is the target to aim for, not a forget ROUGE of 0: the facts share "
        "their wording (the person's name is in the question and again in the answer), so even a model that "
        "never saw them scores well above 0. A forget ROUGE far below it with retain and general ROUGE down "
        "too is damage, not forgetting; an AUC far below 0.5 (positive PrivLeak) means the forget facts now "
        "look *less* familiar than never-seen ones, itself a tell. Refusal methods (IDK+AP, DPO) lower "
        "ROUGE by refusing while the likelihoods (AUC, ES) can still show the facts.",
    ]
    if budget["trials"]:
        lines += ["", "Before tuning every method had one budget (10 epochs, lr 1e-3, retain weight 1): "
                      "[leaderboard_single_budget.md](leaderboard_single_budget.md)."]
    lines += ["", f"![forget efficacy against utility, every trial]({png_name})"]
    return "\n".join(lines) + "\n"


def other_builds(results: dict) -> list[tuple[list[str], dict]]:
    """The methods measured on a build of the target other than the results file's current one, grouped by build,
    each with that build's own target row (methods without a record are taken as the current build's)."""
    current = results.get("fingerprint")
    groups: dict[str, tuple[list[str], dict]] = {}
    for method, e in results["methods"].items():
        build = e.get("target")
        if build and current and build["fingerprint"] != current:
            key = json.dumps(build["fingerprint"], sort_keys=True)
            groups.setdefault(key, ([], build["row"]))[0].append(method)
    return list(groups.values())


def plot(results: dict, path: Path) -> None:
    """The Pareto plot: every trial's forget efficacy against utility (validation split), the chosen one ringed;
    with ``--trials 0`` each method's test seeds instead."""
    from bench import tune

    methods = {}
    for method, e in results["methods"].items():
        points = e["trials"] or [s["parts"] for s in e["seeds"]]
        methods[method] = {"trials": points, "chosen": e["chosen"] or e["seeds"][0]["parts"]}
    tune.plot(methods, path)


def main(argv: list[str] | None = None) -> str:
    import torch

    from bench import tune
    from utils.cli import setup_logging
    from utils.fingerprint import model_fingerprint
    from zoo.demo_data import REFUSALS
    from zoo.wheel_models import is_complete

    args = parse_args(argv)
    setup_logging()
    unknown = [m for m in args.methods if m not in tune.SPACES]
    if unknown:
        raise SystemExit(f"error: --methods: no search space for {', '.join(unknown)}; known: {', '.join(tune.SPACES)}")
    base = Path(args.base)
    if not is_complete(base):
        raise SystemExit(f"error: {base} is not installed; run `python fetch_model.py smollm2-135m-instruct`")
    results_path = Path(args.results)
    results = load_results(results_path, budget_of(args))
    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = build_data(work, base)
    target, retain_only = build_models(work, base, data)
    fingerprint = model_fingerprint(target)
    if results.get("fingerprint") not in (None, fingerprint) and results["methods"]:
        print(f"warning: the target in {work} differs from the one {results_path}'s methods "
              f"({', '.join(results['methods'])}) were measured on (rebuilt on another machine?); their numbers "
              "are kept, the new methods' come from this target", file=sys.stderr, flush=True)
    results["fingerprint"] = fingerprint
    refusals = [r for r in REFUSALS if r.isascii()]
    control_summary = evaluate(retain_only, None, data, refusals, work / "eval" / "retain_only")
    target_summary = evaluate(target, None, data, refusals, work / "eval" / "target", control_summary)
    world = {"work": work, "target": target, "family": FAMILY, "pairs": data,
             "layers": int(json.loads((target / "config.json").read_text())["num_hidden_layers"])}
    start = tune.start_metrics(world)
    attacks = tuple(a for a in args.attacks.split(",") if a)
    control_attacked = None
    if attacks:
        from bench.robustness import attack_runs

        control_attacked = attack_runs(work, {}, attacks)["control"]
    results["target"] = row("(target, before)", target_summary, None)
    results["control"] = row("(retain-only model)", control_summary, None, control_attacked)
    for method in args.methods:
        if method in results["methods"]:
            print(f"{method}: in {results_path} already", flush=True)
            continue
        entry = run_method(world, method, args, data, refusals, control_summary, start)
        # which build of the target it was measured on: a build on another machine differs in the last bits
        entry["target"] = {"fingerprint": fingerprint, "row": results["target"]}
        results["methods"][method] = entry
        save_results(results_path, results)
        write_table(results, threads, Path(args.out))  # after every method: a killed run leaves a table
        score = cell([s["parts"]["score"] for s in entry["seeds"]], "{:.3f}")
        print(f"{method}: settings {tune.settings_text(entry['settings'])}, test score {score}", flush=True)
    save_results(results_path, results)
    text = write_table(results, threads, Path(args.out))
    print(text)
    return text


def write_table(results: dict, threads: int, out: Path) -> str:
    """The table (atomically) and, once a method has finished, the plot beside it."""
    from utils.files import atomic_path

    text = table(results, threads, out.with_suffix(".png").name)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    if results["methods"]:
        plot(results, out.with_suffix(".png"))
    return text


if __name__ == "__main__":
    main()
