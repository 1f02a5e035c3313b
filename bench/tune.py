"""Equal-budget tuning: every method gets the same number of Optuna trials over its own search space, is
scored on a validation split of the facts, and is reported on a disjoint test split over several seeds.

    python fetch_model.py smollm2-135m-instruct        # once
    python bench/tune.py                                # SmolLM2 target; resumable; writes bench/tune.{md,png}
    python bench/tune.py --methods ME+GD NPO+GD --trials 4 --seeds 3    # a subset (the studies are kept)
    python bench/tune.py --model tiny --trials 3 --epochs_range 1,3 --workdir runs/tune_tiny   # minutes

The facts are split before anything runs: the target memorises a **validation** and a **test** forget split
(and the retain facts); two holdout splits of the same kind are never trained (MIA non-members). Each trial
unlearns the validation split and is scored there; the chosen settings (the best trial's) then unlearn the test
split with ``--seeds`` seeds, and only those numbers are reported (mean ± 95 % t interval).

**The objective, fixed before any trial** (:func:`objective_score`): the harmonic mean of forget efficacy
``1 - forget answer probability``, privacy ``1 - 2 |AUC_LOSS(forget vs holdout) - 0.5|`` (0.5: the forget
facts look like facts never trained on) and utility ``min(retain probability / the target's, 1)``; a trial that
keeps less than 80 % of the target's retain probability scores 0 (OpenUnlearning's filter of runs that lose
more than 20 % utility; its method score is this harmonic mean of memorisation, privacy and utility).

**Search spaces** (:data:`SPACES`): for every method the learning rate (log-uniform over ``--lr_range``), the
retain weight (log-uniform 0.5-5, OpenUnlearning's grid {1, 2, 5}) and the epochs (``--epochs_range``), plus the
method's own knobs (NPO/DPO/IDK+AP beta, SimNPO beta and delta, RMU layer and steering coefficient, UNDIAL beta,
WGA beta, SatImp betas, PDU dual step). The sampler is Optuna's TPE, seeded; the studies live in SQLite
(``<workdir>/studies.db``), so a killed run resumes where it stopped and never repeats a finished trial.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["ME+GD", "IDK+AP", "GA+GD", "NPO+GD", "SimNPO+GD", "DPO+GD", "RMU", "UNDIAL+GD", "WGA+GD", "SatImp+GD",
           "CE-U+GD", "PDU"]
UTILITY_FILTER = 0.8
SPLITS = ("val", "test", "holdout_val", "holdout_test", "retain")


def objective_score(metrics: Mapping[str, float], start: Mapping[str, float],
                    utility_filter: float = UTILITY_FILTER) -> dict[str, float]:
    """Forget efficacy, privacy, utility and their harmonic mean (0 under the utility filter) of one model's
    :func:`evals.robustness.quick_metrics` against the target's (``start``)."""
    efficacy = 1.0 - metrics["forget_prob"]
    privacy = max(0.0, 1.0 - 2.0 * abs(metrics["auc_loss"] - 0.5))
    utility = min(metrics["retain_prob"] / start["retain_prob"], 1.0)
    parts = (efficacy, privacy, utility)
    if not all(math.isfinite(p) for p in parts):  # a diverged run (NaN losses): it scores nothing
        return {"efficacy": efficacy, "privacy": privacy, "utility": utility, "score": 0.0}
    score = 0.0 if utility < utility_filter or min(parts) <= 0 else len(parts) / sum(1.0 / p for p in parts)
    return {"efficacy": efficacy, "privacy": privacy, "utility": utility, "score": score}


def _log(trial, name: str, lo: float, hi: float) -> float:
    return trial.suggest_float(name, lo, hi, log=True)


def _beta(trial, layers: int) -> dict:
    return {"beta": _log(trial, "beta", 0.05, 1.0)}


# method -> its own knobs: (trial, decoder layers) -> {option name without dashes: value}
SPACES: dict[str, Callable[..., dict]] = {
    "ME+GD": lambda t, n: {},
    "GA+GD": lambda t, n: {},
    "CE-U+GD": lambda t, n: {},
    "IDK+AP": _beta,
    "NPO+GD": _beta,
    "DPO+GD": _beta,
    "SimNPO+GD": lambda t, n: {"simnpo_beta": _log(t, "simnpo_beta", 1.0, 10.0),
                               "simnpo_delta": t.suggest_float("simnpo_delta", 0.0, 2.0)},
    "RMU": lambda t, n: {"rmu_layer": t.suggest_int("rmu_layer", max(0, n // 3), n - 1),
                         "rmu_steering_coeff": _log(t, "rmu_steering_coeff", 1.0, 30.0)},
    "UNDIAL+GD": lambda t, n: {"undial_beta": _log(t, "undial_beta", 1.0, 20.0)},
    "WGA+GD": lambda t, n: {"wga_beta": t.suggest_float("wga_beta", 0.5, 3.0)},
    "SatImp+GD": lambda t, n: {"satimp_beta1": t.suggest_float("satimp_beta1", 1.0, 10.0),
                               "satimp_beta2": t.suggest_float("satimp_beta2", 0.5, 3.0)},
    "PDU": lambda t, n: {"pdu_dual_step_size": _log(t, "pdu_dual_step_size", 0.1, 10.0)},
}


def suggest(trial, method: str, layers: int, lr_range: tuple[float, float], epochs_range: tuple[int, int]) -> dict:
    """One trial's settings: the shared ones, then the method's own."""
    settings = {"lr": _log(trial, "lr", *lr_range),
                "regularization_coeff": _log(trial, "regularization_coeff", 0.5, 5.0),
                "num_epochs": trial.suggest_int("num_epochs", *epochs_range)}
    return {**settings, **SPACES[method](trial, layers)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"],
                        help="smollm2: SmolLM2-135M-Instruct memorises the facts; tiny: a 2-layer model built in code")
    parser.add_argument("--base", default=str(ROOT / "models" / "smollm2-135m-instruct"), help="--model smollm2's base")
    parser.add_argument("--methods", nargs="+", default=METHODS, help="--loss_type values")
    parser.add_argument("--trials", type=int, default=4, help="Optuna trials per method (the same for every one)")
    parser.add_argument("--seeds", type=int, default=3, help="test-split runs of each method's chosen settings")
    parser.add_argument("--lr_range", default="1e-4,5e-3", help="learning rate, log-uniform between these")
    parser.add_argument("--epochs_range", default="3,10", help="epochs, an integer between these")
    parser.add_argument("--seed", type=int, default=0, help="the samplers' seed")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "tune"), help="models, studies, runs (kept)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "tune.md"), help="the table (the PNG beside it)")
    return parser.parse_args(argv)


def build_world(work: Path, model: str, base: Path) -> dict:
    """The splits (written as JSONL), the memorised target, its family and decoder layer count."""
    from utils.files import write_jsonl
    from zoo.demo_data import REFUSALS, definition_items, pairs_of, privacy_items

    facts = privacy_items(48, seed=11)
    splits = {"val": facts[:12], "test": facts[12:24], "holdout_val": facts[24:36], "holdout_test": facts[36:48],
              "retain": definition_items()[:12]}
    for name, items in splits.items():
        write_jsonl(work / f"{name}.jsonl", items)
    (work / "idk.txt").write_text("\n".join(r for r in REFUSALS if r.isascii()) + "\n", encoding="utf-8")
    pairs = {name: pairs_of(items) for name, items in splits.items()}
    target = work / "target"
    trained = pairs["val"] + pairs["test"] + pairs["retain"]
    if not (target / "config.json").is_file():
        if model == "tiny":
            from zoo.tiny import build_target_model

            build_target_model(target, trained, vocabulary=[p for v in pairs.values() for p in v])
        else:
            from zoo.demo_data import REPLAY
            from zoo.target import build_memorised_model

            build_memorised_model(base, target, trained, "smollm2", epochs=10, lr=5e-4, replay=REPLAY[:8],
                                  replay_tokens=24)
    config = json.loads((target / "config.json").read_text())
    return {"work": work, "target": target, "family": "tiny" if model == "tiny" else "smollm2", "pairs": pairs,
            "layers": int(config["num_hidden_layers"])}


def score(world: Mapping, adapter: Path | None, split: str, generate: bool = False) -> dict[str, float]:
    """quick_metrics of the target (with ``adapter``) on a forget split, its holdout and the retain facts."""
    from evals.robustness import quick_metrics
    from utils.chat_template import load_chat_template
    from utils.loading import load_for_eval

    model, tokenizer = load_for_eval(world["target"], adapter)
    pairs = world["pairs"]
    sets = {"forget": pairs[split], "retain": pairs["retain"], "holdout": pairs[f"holdout_{split}"]}
    return quick_metrics(model, tokenizer, load_chat_template(world["family"]), sets, generate=generate)


def start_metrics(world: Mapping) -> dict[str, float]:
    """The target's own metrics on the validation split (cached): the utility the filter holds."""
    from utils.files import write_json

    path = world["work"] / "start.json"
    if not path.is_file():
        write_json(path, score(world, None, "val"))
    return json.loads(path.read_text())


def unlearn(world: Mapping, method: str, settings: Mapping, split: str, run: Path, seed: int) -> Path:
    """Train one LoRA adapter on ``split`` with ``settings``; its final folder."""
    from trainer.recipe import main_for

    work = world["work"]
    flags = [x for k, v in settings.items() for x in (f"--{k}", str(v))]
    return main_for("me_gd", ["--model_path", str(world["target"]), "--model_family", world["family"],
                              "--loss_type", method, "--forget_data_path", str(work / f"{split}.jsonl"),
                              "--retain_data_path", str(work / "retain.jsonl"), "--idk_data_path",
                              str(work / "idk.txt"), "--bs", "4", "--mask", "true", "--forget_coeff", "1.0",
                              "--save_steps", "0", "--seed", str(seed), *flags, "--output_dir", str(run),
                              "--overwrite"], "tune")


def tune(world: Mapping, method: str, args: argparse.Namespace, start: Mapping) -> object:
    """The method's study with ``args.trials`` finished trials (resumed from the SQLite file)."""
    import optuna

    lr_range = tuple(float(x) for x in args.lr_range.split(","))
    epochs_range = tuple(int(x) for x in args.epochs_range.split(","))
    storage = f"sqlite:///{world['work'] / 'studies.db'}"
    probe = open_study(storage, method, {"lr_range": list(lr_range), "epochs_range": list(epochs_range),
                                         "seed": args.seed})
    done = [t for t in probe.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # seeded by how many trials exist: a resumed study does not replay the proposals it already made
    sampler = optuna.samplers.TPESampler(seed=args.seed + len(probe.trials), n_startup_trials=3)
    study = optuna.load_study(study_name=method, storage=storage, sampler=sampler)

    def objective(trial) -> float:
        settings = suggest(trial, method, world["layers"], lr_range, epochs_range)
        run = world["work"] / "trials" / method / f"trial_{trial.number}"
        begin = time.perf_counter()
        final = unlearn(world, method, settings, "val", run, seed=1001)
        metrics = score(world, final, "val")
        parts = objective_score(metrics, start)
        for key, value in {**metrics, **parts, "minutes": (time.perf_counter() - begin) / 60}.items():
            trial.set_user_attr(key, value)
        shutil.rmtree(run, ignore_errors=True)  # the numbers are in the study; the adapter is not needed again
        return parts["score"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for _ in range(3):  # a trial that raised is not counted: run more until every method has --trials finished
        remaining = args.trials - len(done)
        if remaining <= 0:
            break
        study.optimize(objective, n_trials=remaining, catch=(RuntimeError, ValueError))
        done = finished(study)
    if len(done) < args.trials:
        raise SystemExit(f"{method}: only {len(done)} of {args.trials} trials finished (see {storage})")
    return study


def open_study(storage: str, method: str, search: Mapping) -> object:
    """The method's study in ``storage``, created or resumed; ``search`` (the ranges and the sampler's seed) is
    stamped on it, and a study made for another search is refused: its trials would be mixed into this one's."""
    import optuna

    study = optuna.create_study(study_name=method, storage=storage, direction="maximize", load_if_exists=True)
    stamped = study.user_attrs.get("search")
    if stamped is None:  # new, or made before studies were stamped (its trials are taken as this search's)
        study.set_user_attr("search", dict(search))
    elif stamped != dict(search):
        raise SystemExit(f"error: {storage} holds a {method} study of another search ({stamped}, this run: "
                         f"{dict(search)}); pass another --workdir or delete the file")
    return study


def finished(study) -> list:
    import optuna

    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def chosen_settings(study) -> dict:
    """The best finished trial's settings (ties: the earliest)."""
    best = max(finished(study), key=lambda t: (t.value, -t.number))
    return dict(best.params), best


def test_runs(world: Mapping, method: str, settings: Mapping, seeds: int, start: Mapping) -> list[dict]:
    """The chosen settings on the test split, one run per seed (each cached with the settings it ran)."""
    from utils.files import write_json

    rows = []
    for k in range(seeds):
        seed = 1001 + k
        run = world["work"] / "test" / method / f"seed{seed}"
        cache = run / "metrics.json"
        if cache.is_file() and json.loads(cache.read_text()).get("settings") == dict(settings):
            rows.append(json.loads(cache.read_text()))
            continue
        begin = time.perf_counter()
        final = unlearn(world, method, settings, "test", run, seed)
        metrics = score(world, final, "test", generate=True)
        test_start = {"retain_prob": start["retain_prob"]}
        row = {"settings": dict(settings), "seed": seed, "metrics": metrics,
               "parts": objective_score(metrics, test_start), "minutes": (time.perf_counter() - begin) / 60}
        write_json(cache, row)
        rows.append(row)
    return rows


def interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def rank(scores: Mapping[str, Sequence[float]]) -> list[tuple[str, float, float]]:
    """(method, mean score, 95 % half-width) for each method's scores over its seeds, best mean first."""
    return sorted(((method, *interval(values)) for method, values in scores.items()), key=lambda x: -x[1])


def overlaps(ranked: Sequence[tuple[str, float, float]]) -> list[str]:
    """Pairs of neighbouring methods (by mean) whose 95 % intervals overlap: their order is within noise."""
    out = []
    for (a, ma, ha), (b, mb, hb) in zip(ranked, ranked[1:], strict=False):
        if ma - ha <= mb + hb:
            out.append(f"{a} / {b}")
    return out


def settings_text(settings: Mapping) -> str:
    """``lr 0.000554, num_epochs 10``: a run's settings for a table cell."""
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items())


def table(results: Mapping[str, Mapping], args: argparse.Namespace) -> str:
    def ci(values: Sequence[float]) -> str:
        mean, half = interval(values)
        return f"{mean:.3f} ± {half:.3f}"

    ranked = rank({method: [r["parts"]["score"] for r in res["test"]] for method, res in results.items()})
    lines = [f"Equal-budget tuning ({args.trials} trials per method on the validation split, {args.seeds} seeds on "
             f"the test split; model {args.model}; `python bench/tune.py`). Test-split numbers: mean ± 95 % t "
             "interval over the seeds.", "",
             "| method | chosen settings | val score | test score | forget prob | forget ROUGE-L F | "
             "retain ROUGE-L F | AUC LOSS | forget ES | minutes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, _, _ in ranked:
        res = results[method]
        settings = settings_text(res["settings"])
        runs = res["test"]

        def col(key: str, runs=runs) -> str:
            values = [r["metrics"].get(key) for r in runs]
            return ci(values) if None not in values else "-"

        lines.append(f"| {method} | {settings} | {res['val_score']:.3f} | "
                     f"{ci([r['parts']['score'] for r in runs])} | {col('forget_prob')} | {col('forget_rouge_f')} | "
                     f"{col('retain_rouge_f')} | {col('auc_loss')} | {col('forget_es')} | {res['minutes']:.1f} |")
    close = overlaps(ranked)
    lines += ["", "Within noise (neighbours by test score whose intervals overlap): " + (", ".join(close) or "none")]
    return "\n".join(lines)


def plot(results: Mapping[str, Mapping], path: Path) -> None:
    """Forget efficacy against utility, one point per trial, each method's chosen trial ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.files import atomic_path

    fig, ax = plt.subplots(figsize=(7, 5))
    for method, res in results.items():
        points = ax.scatter([t["efficacy"] for t in res["trials"]], [t["utility"] for t in res["trials"]], s=18,
                            alpha=0.6, label=method)
        chosen = res["chosen"]
        ax.scatter([chosen["efficacy"]], [chosen["utility"]], s=120, facecolors="none",
                   edgecolors=points.get_facecolor()[0], linewidths=2)
    ax.axhline(UTILITY_FILTER, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("forget efficacy (1 - answer probability), validation split")
    ax.set_ylabel("utility (retain probability / target's)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from utils.cli import setup_logging
    from utils.files import atomic_path

    args = parse_args(argv)
    setup_logging()
    unknown = [m for m in args.methods if m not in SPACES]
    if unknown:
        raise SystemExit(f"--methods: no search space for {', '.join(unknown)}; known: {', '.join(SPACES)}")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    world = build_world(work, args.model, Path(args.base))
    start = start_metrics(world)
    results = {}
    for method in args.methods:
        study = tune(world, method, args, start)
        settings, best = chosen_settings(study)
        trials = [dict(t.user_attrs, number=t.number, params=t.params) for t in finished(study)]
        runs = test_runs(world, method, settings, args.seeds, start)
        results[method] = {"settings": settings, "val_score": best.value, "trials": trials,
                           "chosen": dict(best.user_attrs, number=best.number), "test": runs,
                           "minutes": sum(t["minutes"] for t in trials) + sum(r["minutes"] for r in runs)}
        print(f"{method}: {len(trials)} trials, best val score {best.value:.3f} with {settings}", flush=True)
    out = Path(args.out)
    text = table(results, args)
    with atomic_path(out) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    with atomic_path(work / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1), encoding="utf-8")
    plot(results, out.with_suffix(".png"))
    print(text)
    return results


if __name__ == "__main__":
    main()
