"""Each open-unlearning method of the forget scripts, on the real instruct model (SmolLM2-135M-Instruct) that
memorised 8 private facts: the facts' answer NLL rises far above the target's while everyday answers stay. Apart
from tests/test_real_model.py so pytest-xdist (`--dist loadfile`) runs the two files on different workers; the
target is built once for both (tests/real_smollm2.py)."""

from __future__ import annotations

import pytest

import forget_me_gd
from tests.real_smollm2 import answer_nll, build_memorised, load, run_args, run_folder
from zoo.demo_data import REPLAY

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def memorised(real_model_dir, tmp_path_factory) -> dict:
    return build_memorised(real_model_dir, run_folder(tmp_path_factory))


# Per method: its extra flags. One budget (5 epochs, bs 4, lr 1e-3, --mask true) but for three methods whose
# step size differs: SatImp's weighting shrinks its gradient (at 1e-3 its forget NLL only reached 0.38), PDU's dual
# ascent overshoots retain at 1e-3 (everyday NLL 0.37), and RMU steers one layer (at 1e-3 its 10 steps barely move
# layer 7; bench/README.md). Measured with 1 thread: forget NLL 0.010 -> SimNPO 1.25, UNDIAL 0.97, WGA 1.46,
# SatImp 1.46, CE-U 1.78, PDU 0.93, RMU 4.86 (every one above 90x); everyday NLL 0.002 -> at most 0.15 (CE-U).
METHODS = {
    "SimNPO+GD": (),
    "UNDIAL+GD": (),
    "WGA+GD": (),
    "SatImp+GD": ("--lr", "2e-3"),
    "CE-U+GD": (),
    "PDU": ("--lr", "7e-4"),
    "RMU": ("--lr", "1e-2", "--rmu_layer", "7"),
}
RETAIN_RISE = 0.3  # the everyday answers' NLL may rise by at most this


@pytest.mark.parametrize("loss_type", list(METHODS))
def test_each_method_forgets_facts_and_keeps_everyday_answers(memorised, loss_type):
    replay = list(zip(REPLAY[:8], memorised["replay_answers"], strict=True))
    retain0 = memorised["replay_nll"]  # the target's, measured once when it was built
    final = forget_me_gd.main(run_args(memorised, loss_type, "--loss_type", loss_type, "--num_epochs", "5",
                                       "--lr", "1e-3", "--mask", "true", *METHODS[loss_type]))
    model, tokenizer = load(memorised["target"], final)
    forget, retain = answer_nll(model, tokenizer, memorised["pairs"]), answer_nll(model, tokenizer, replay)
    print(f"{loss_type}: forget NLL {memorised['nll']:.3f} -> {forget:.3f}; everyday NLL {retain0:.3f} -> {retain:.3f}")
    assert forget > 20 * memorised["nll"] and forget > 0.3
    assert retain < retain0 + RETAIN_RISE


