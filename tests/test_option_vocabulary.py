"""One option vocabulary across the evaluation commands, the seed's names kept as aliases."""

from __future__ import annotations

import pytest

import evaluate
import evaluate_robustness
import evaluate_tofu
import evaluate_unlearning
import extract_data
import predict_demo


def test_every_evaluation_command_reads_model_path_adapter_family_and_out():
    tofu = evaluate_tofu.parse_args(["--model_path", "m", "--adapter", "a", "--model_family", "tiny", "--out", "o"])
    unlearning = evaluate_unlearning.parse_args(["--model_path", "m", "--adapter", "a", "--model_family", "tiny",
                                                 "--forget", "f.jsonl", "--out", "o"])
    robustness = evaluate_robustness.parse_args(["--model_path", "m", "--adapter", "a", "--model_family", "tiny",
                                                 "--forget", "f.jsonl", "--control_model", "c", "--out", "o"])
    for args in (tofu, unlearning, robustness):
        assert (args.model_path, args.adapter, args.model_family, args.out) == ("m", "a", "tiny", "o")
    for args in (unlearning, robustness):  # the sets too: one group of options (utils.cli.add_evaluation_sets)
        assert (args.forget, args.retain, args.holdout, args.refusals) == ("f.jsonl", None, None, None)
    atec = evaluate.parse_args(["--model_path", "judge", "--test_data", "t", "--user_out_path", "u", "--out", "o"])
    assert (atec.model_path, atec.out) == ("judge", "o")


@pytest.mark.parametrize(("module", "seed_args", "field", "value"), [
    (evaluate, ["--model_name", "judge", "--test_data", "t", "--user_out_path", "u", "--out_path", "o"],
     "model_path", "judge"),
    (evaluate, ["--model_name", "judge", "--test_data", "t", "--user_out_path", "u", "--out_path", "o"], "out", "o"),
    (evaluate_tofu, ["--model_path", "m", "--save_dir", "o"], "out", "o"),
    (evaluate_tofu, ["--model_path", "m", "--model_type", "tiny"], "model_family", "tiny"),
    (evaluate_unlearning, ["--model_path", "m", "--model_type", "tiny", "--forget", "f", "--out", "o"],
     "model_family", "tiny"),
    (predict_demo, ["--model_path", "m", "--data_path", "d", "--output_path", "p", "--model_type", "tiny"],
     "model_family", "tiny"),
    (predict_demo, ["--model_path", "m", "--data_path", "d", "--output_path", "p", "--model_family", "tiny"],
     "model_family", "tiny"),
    (extract_data, ["--test_data", "t", "--user_out_path", "u", "--forget_out_path", "f", "--retain_out_path", "r",
                    "--model_type", "tiny"], "model_family", "tiny"),
])
def test_the_seeds_names_stay_aliases(module, seed_args, field, value):
    assert getattr(module.parse_args(seed_args), field) == value
