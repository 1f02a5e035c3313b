"""bench/tune.py: the objective and the intervals against hand values; on the tiny model, every method gets the
same trials, the validation and test facts are disjoint, and a resumed study continues without repeating."""

from __future__ import annotations

import pytest

from bench.tune import interval, objective_score, overlaps


def test_the_objective_is_the_harmonic_mean_under_the_utility_filter():
    parts = objective_score({"forget_prob": 0.2, "auc_loss": 0.6, "retain_prob": 0.9}, {"retain_prob": 1.0})
    assert parts["efficacy"] == pytest.approx(0.8) and parts["privacy"] == pytest.approx(0.8)
    assert parts["utility"] == pytest.approx(0.9)
    assert parts["score"] == pytest.approx(3 / (1 / 0.8 + 1 / 0.8 + 1 / 0.9))  # 0.830769...
    assert parts["score"] == pytest.approx(0.830769, abs=1e-6)
    # an AUC under 0.5 is over-unlearning: as far from the ideal as the same distance above
    low = objective_score({"forget_prob": 0.2, "auc_loss": 0.4, "retain_prob": 0.9}, {"retain_prob": 1.0})
    assert low["privacy"] == pytest.approx(0.8)
    # 79 % of the target's utility: filtered out, whatever it forgot
    assert objective_score({"forget_prob": 0.0, "auc_loss": 0.5, "retain_prob": 0.79},
                           {"retain_prob": 1.0})["score"] == 0.0
    # utility above the target's counts as the target's
    assert objective_score({"forget_prob": 0.5, "auc_loss": 0.5, "retain_prob": 1.2},
                           {"retain_prob": 1.0})["utility"] == 1.0


def test_intervals_and_overlaps_by_hand():
    mean, half = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-6)  # t(0.975, 2) x sd 1 / sqrt 3
    assert interval([0.4]) == (0.4, 0.0)
    assert overlaps([("a", 0.9, 0.05), ("b", 0.8, 0.06), ("c", 0.5, 0.1)]) == ["a / b"]


@pytest.mark.slow
def test_equal_trials_disjoint_splits_and_a_resumed_study_that_does_not_repeat(tmp_path):
    import optuna

    from bench import tune
    from dataset.reading import load_qa_jsonl

    common = ["--model", "tiny", "--methods", "ME+GD", "NPO+GD", "--seeds", "2", "--epochs_range", "1,2",
              "--lr_range", "1e-3,1e-2", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "tune.md")]
    first = tune.main([*common, "--trials", "2"])
    questions = {name: {it.question for it in load_qa_jsonl(tmp_path / "work" / f"{name}.jsonl")}
                 for name in tune.SPLITS}
    names = list(questions)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not questions[a] & questions[b], (a, b)
    storage = f"sqlite:///{tmp_path / 'work' / 'studies.db'}"
    before = {m: [t.params for t in optuna.load_study(study_name=m, storage=storage).trials] for m in first}
    assert {m: len(p) for m, p in before.items()} == {"ME+GD": 2, "NPO+GD": 2}
    again = tune.main([*common, "--trials", "3"])
    for method in again:
        trials = optuna.load_study(study_name=method, storage=storage).trials
        assert [t.number for t in trials] == [0, 1, 2]  # continued, none rerun
        assert [t.params for t in trials[:2]] == before[method]
        assert trials[2].params not in before[method]
        assert len(again[method]["trials"]) == 3 and len(again[method]["test"]) == 2
        if again[method]["settings"] == first[method]["settings"]:  # the same choice: the test runs are reused
            assert again[method]["test"] == first[method]["test"]
    text = (tmp_path / "tune.md").read_text()
    assert "| ME+GD |" in text and "| NPO+GD |" in text and "±" in text
    assert (tmp_path / "tune.png").read_bytes()[:4] == b"\x89PNG"


def test_the_default_command_has_a_space_for_every_method_it_names():
    from bench import tune
    from trainer.losses import LOSSES

    args = tune.parse_args([])
    assert args.model == "smollm2" and args.trials >= 1 and args.seeds == 3
    assert set(args.methods) <= set(tune.SPACES) and set(tune.SPACES) <= set(LOSSES)


def test_a_study_of_another_search_is_refused_not_mixed(tmp_path):
    """A study is stamped with its ranges and seed: the same search resumes it, another one is refused (its trials
    would have joined the new search's and picked its best); an unstamped study (made before stamps) is adopted."""
    import optuna

    from bench import tune

    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    search = {"lr_range": [1e-4, 5e-3], "epochs_range": [3, 10], "seed": 0}
    tune.open_study(storage, "ME+GD", search).enqueue_trial({"lr": 1e-3})
    assert len(tune.open_study(storage, "ME+GD", search).trials) == 1  # resumed: the same study
    with pytest.raises(SystemExit, match="another search.*--workdir"):
        tune.open_study(storage, "ME+GD", {**search, "lr_range": [1e-5, 1e-3]})
    optuna.create_study(study_name="RMU", storage=storage)
    assert tune.open_study(storage, "RMU", search).user_attrs["search"] == search
