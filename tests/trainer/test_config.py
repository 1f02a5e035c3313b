"""The method's settings travel in one typed config (UnlearnTrainingArguments) and PDU's state in a small object."""

from __future__ import annotations

import dataclasses

import pytest

from trainer.config import DualWeight, UnlearnTrainingArguments
from trainer.losses import LossSettings


def test_the_config_holds_every_loss_hyper_parameter_with_its_papers_default():
    """Each LossSettings field is a config field of the same default, and loss_params() carries a changed value
    through to what the terms read."""
    config = UnlearnTrainingArguments(output_dir="unused", report_to=[])
    for field in dataclasses.fields(LossSettings):
        assert getattr(config, field.name) == field.default, field.name
    assert config.beta == 0.1 and config.me_floor == 1e-12 and config.kl_reduction == "tokens"  # the papers' values
    assert UnlearnTrainingArguments("first", report_to=[]).output_dir == "first"  # TrainingArguments' fields first
    changed = UnlearnTrainingArguments(output_dir="unused", report_to=[], beta=0.5, kl_reduction="batchmean",
                                       me_floor=0.0)
    params = changed.loss_params()
    assert (params.beta, params.kl_reduction, params.me_floor) == (0.5, "batchmean", 0.0)
    assert "simnpo_beta" in changed.to_dict() and changed.to_dict()["loss_type"] == "ME+GD"  # saved with the run


def test_the_config_refuses_an_unknown_method_or_reduction():
    with pytest.raises(ValueError, match="loss_type"):
        UnlearnTrainingArguments(output_dir="unused", report_to=[], loss_type="ME+XX")
    with pytest.raises(ValueError, match="loss_reduction"):
        UnlearnTrainingArguments(output_dir="unused", report_to=[], loss_reduction="sum")


def test_dual_weight_steps_and_restores_its_state():
    """Without a bound the first retain loss becomes it; the weight rises by step_size x (loss - bound) while the
    bound is broken, never below 0; state_dict/load_state_dict round-trip."""
    dual = DualWeight(1.0, None, step_size=0.5)
    dual.update(2.0)  # the bound becomes 2.0: no change
    assert (dual.weight, dual.epsilon) == (1.0, 2.0)
    dual.update(3.0)
    assert dual.weight == pytest.approx(1.5)
    dual.update(0.0)
    assert dual.weight == pytest.approx(0.5)
    dual.update(0.0)
    assert dual.weight == 0.0
    restored = DualWeight(1.0, None, step_size=0.5)
    restored.load_state_dict({"weight": 0.7, "epsilon": 2.0})
    assert restored.state_dict() == {"weight": 0.7, "epsilon": 2.0}
