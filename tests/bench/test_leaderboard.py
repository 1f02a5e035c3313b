"""bench/leaderboard.py's bookkeeping, without a model: the results file of one budget (another is refused), the
table's means and intervals against hand values, the ranking by test score and the methods still to run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import leaderboard


def seed_row(forget: float, score: float, minutes: float = 1.0, **extra) -> dict:
    row = {"method": "m", "forget": forget, "retain": 0.9, "general": 0.4, "auc_loss": 0.5, "auc_mkpp": 0.5,
           "priv_leak": 2.0, "es": 0.1, "refusal": 0.0, "relearn": None, "quant4": None, "probe": None,
           "minutes": minutes, **extra}
    return {"seed": 0, "row": row, "parts": {"score": score, "efficacy": 0.9, "utility": 0.95}, "minutes": minutes}


def budget(**kw) -> dict:
    args = leaderboard.parse_args([f"--{k}={v}" for k, v in kw.items()])
    return leaderboard.budget_of(args)


def test_a_results_file_holds_one_budget(tmp_path):
    path = tmp_path / "runs.json"
    assert leaderboard.load_results(path, budget()) == {"budget": budget(), "methods": {}}
    leaderboard.save_results(path, {"budget": budget(), "methods": {"ME+GD": {"x": 1}}})
    assert leaderboard.load_results(path, budget())["methods"] == {"ME+GD": {"x": 1}}
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file, none left
    with pytest.raises(SystemExit, match="another budget.*--results"):
        leaderboard.load_results(path, budget(trials=5))
    # the single budget is keyed by its epochs and lr, not the tuning ranges
    assert budget(trials=0, lr=1e-3) != budget(trials=0, lr=2e-3)
    assert "lr_range" not in budget(trials=0) and budget()["trials"] == 3


def test_the_table_ranks_by_test_score_with_t_intervals(tmp_path):
    methods = {
        "ME+GD": {"settings": {"lr": 0.000554, "num_epochs": 10}, "val_score": 0.9, "trials": [], "chosen": None,
                  "minutes": 20.0,
                  "seeds": [seed_row(0.30, 0.6, relearn=0.5), seed_row(0.40, 0.7), seed_row(0.50, 0.8)]},
        "NPO+GD": {"settings": {"lr": 0.004, "num_epochs": 9}, "val_score": 0.95, "trials": [], "chosen": None,
                   "minutes": 12.0, "seeds": [seed_row(0.2, 0.90), seed_row(0.2, 0.92), seed_row(0.2, 0.94)]},
    }
    results = {"budget": budget(), "methods": methods, "target": seed_row(0.9, 0)["row"],
               "control": seed_row(0.7, 0, relearn=0.71)["row"]}
    text = leaderboard.table(results, threads=2)
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert lines[0].startswith("| method | chosen settings | val score | test score | forget ROUGE")
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| (target, before)", "| (retain-only model)",
                                                           "| NPO+GD", "| ME+GD"]  # best test score first
    me = lines[-1].split(" | ")
    # forget ROUGE 0.3, 0.4, 0.5: mean 0.4, sd 0.1, t(0.975, 2) = 4.3027 -> half-width 0.248
    assert me[4] == "0.400 ± 0.248"
    assert me[3] == "0.700 ± 0.248" and me[2] == "0.900"
    assert me[1] == "lr 0.000554, num_epochs 10"
    assert me[12] == "0.500"  # relearn: the first seed's model only
    assert me[-1] == "1.0 / 20 |"
    assert lines[3].split(" | ")[4] == "0.200 ± 0.000"
    assert "Within noise (neighbours by test score whose 95 % intervals overlap): NPO+GD / ME+GD" in text
    assert "Not yet run (`python bench/leaderboard.py` resumes): IDK+AP, GA+GD" in text
    assert "3 Optuna trials" in text and "over 3 seeds" in text


def test_the_default_command_runs_every_method_tune_can_search():
    from bench import tune

    args = leaderboard.parse_args([])
    assert set(args.methods) == set(tune.SPACES) and args.trials == 3 and args.seeds == 3
    assert args.results.endswith("bench/leaderboard_runs.json")
    assert json.loads(json.dumps(leaderboard.budget_of(args))) == leaderboard.budget_of(args)  # storable


def test_a_model_is_reused_only_for_its_recipe_and_a_retrained_run_loses_its_cached_numbers(tmp_path):
    recipe = {"base": "b", "pairs": [["q", "a"]], "epochs": 10, "lr": 5e-4, "replay": 8}
    model = tmp_path / "target"
    assert not leaderboard.reusable(model, recipe)  # nothing there
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert leaderboard.reusable(model, recipe)  # an old unstamped folder is adopted ...
    assert json.loads((model / leaderboard.RECIPE).read_text()) == recipe  # ... and stamped
    assert not leaderboard.reusable(model, {**recipe, "pairs": [["q", "b"]]})  # other facts: rebuilt
    for path in ("eval/RMU_seed1001/summary.json", "robustness/lr2e-05_s0/RMU_seed1001_relearn.json",
                 "robustness/lr2e-05_s0/RMU_seed10011_relearn.json", "eval/RMU_seed1002/summary.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("{}")
    leaderboard.drop_stale(tmp_path, "RMU_seed1001")
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.json") if "target" not in p.parts)
    assert left == ["eval/RMU_seed1002/summary.json", "robustness/lr2e-05_s0/RMU_seed10011_relearn.json"]


def test_a_rebuilt_target_takes_what_was_measured_on_the_old_one_with_it(tmp_path, monkeypatch):
    """build_models trains only what its recipe does not match; a rebuild clears the evaluations, attacks, runs,
    trials and studies made on the old models (the training itself is replaced by a stand-in that writes a
    config: the bookkeeping is under test here, not the memorising)."""
    import zoo.target

    built = []

    def stand_in(base, out, pairs, family, **kw):
        built.append(Path(out).name)
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")

    monkeypatch.setattr(zoo.target, "build_memorised_model", stand_in)
    data = {"forget": [("q1", "a1")], "retain": [("q2", "a2")], "val": [("q3", "a3")]}
    leaderboard.build_models(tmp_path, Path("base"), data)
    assert built == ["target", "retain_only"]
    for derived in ("eval/x/summary.json", "runs/m_seed1001/settings.json", "studies.db"):
        (tmp_path / derived).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / derived).write_text("{}")
    leaderboard.build_models(tmp_path, Path("base"), data)
    assert built == ["target", "retain_only"] and (tmp_path / "studies.db").is_file()  # reused, kept
    leaderboard.build_models(tmp_path, Path("base"), {**data, "val": [("q3", "changed")]})
    assert built[2:] == ["target", "retain_only"]
    assert not (tmp_path / "eval").exists() and not (tmp_path / "runs").exists()
    assert not (tmp_path / "studies.db").exists()


def test_methods_measured_on_another_build_of_the_target_are_named_with_its_row():
    """A results file resumed on another machine holds methods measured on two builds of the target: the table
    names those of the other build with that build's own target row; records without a build are the current's."""
    old_row = {"forget": 1.0, "retain": 0.992, "general": 0.437, "es": 1.0}
    entry = {"settings": {"lr": 1e-3}, "val_score": 0.5, "trials": [], "chosen": None, "minutes": 3.0,
             "seeds": [seed_row(0.6, 0.5), seed_row(0.62, 0.55)]}
    results = {"budget": budget(), "fingerprint": {"sha": "new"}, "target": None, "control": None,
               "methods": {"ME+GD": {**entry, "target": {"fingerprint": {"sha": "old"}, "row": old_row}},
                           "GA+GD": {**entry, "target": {"fingerprint": {"sha": "old"}, "row": old_row}},
                           "NPO+GD": {**entry, "target": {"fingerprint": {"sha": "new"}, "row": {}}},
                           "RMU": entry}}
    assert leaderboard.other_builds(results) == [(["ME+GD", "GA+GD"], old_row)]
    text = leaderboard.table(results, 2)
    assert "another build of the target" in text
    assert "ME+GD, GA+GD (that build's own row: forget ROUGE 1.000, retain 0.992, general 0.437, ES 1.000)" in text
    results["methods"]["ME+GD"]["target"]["fingerprint"] = {"sha": "new"}
    results["methods"]["GA+GD"].pop("target")
    assert leaderboard.other_builds(results) == [] and "another build" not in leaderboard.table(results, 2)
