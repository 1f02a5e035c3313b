"""--load_in_4bit (QLoRA) on the tiny model: the base loads as 4-bit NF4 (bitsandbytes, which runs on CPU), the
adapter trains, saves and reloads; and its errors come before any model loads."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import forget_me_gd
from tests.conftest import base_args, run_script
from trainer import recipe
from trainer.model_setup import check_load_in_4bit
from utils.errors import UserError

bnb = pytest.importorskip("bitsandbytes")


def parsed(target, tmp_path, *extra: str):
    return recipe.build_parser("me_gd", "").parse_args(base_args(target, tmp_path, *extra))


def test_build_model_quantises_the_base_and_trains_only_the_adapter(target, tmp_path):
    args = parsed(target, tmp_path, "--load_in_4bit")
    model = recipe.build_model(args, recipe.load_chat_template("tiny"), False)
    base = model.get_base_model()
    adapted = [m for m in base.modules() if hasattr(m, "base_layer")]
    assert adapted and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in adapted)
    assert {m.base_layer.weight.quant_type for m in adapted} == {"nf4"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # prepare_model_for_kbit_training: what is not quantised (norms, embeddings, head) computes in float32
    assert base.lm_head.weight.dtype == torch.float32 and not base.lm_head.weight.requires_grad


def test_qlora_run_trains_saves_and_the_adapter_reloads(target, tmp_path):
    from safetensors.torch import load_file

    from utils.loading import load_model

    common = ("--num_epochs", "1", "--bs", "8", "--lr", "1e-3")
    final = forget_me_gd.main(base_args(target, tmp_path / "q", "--load_in_4bit", *common))
    assert final.name == "final_lora_model" and (final / "adapter_config.json").is_file()
    assert json.loads((final.parent / "run_args.json").read_text())["load_in_4bit"] is True
    weights = load_file(final / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # B starts at zero: it trained
    steps = [json.loads(x) for x in (final.parent / "train_log.jsonl").read_text().splitlines()]
    assert len([r for r in steps if "loss" in r]) == 2 and all(math.isfinite(r["loss"]) for r in steps if "loss" in r)

    # the same run on the full-precision base (same seed, data, LoRA init) learns another adapter: the 4-bit
    # base really was what trained
    plain = load_file(forget_me_gd.main(base_args(target, tmp_path / "p", *common)) / "adapter_model.safetensors")
    assert plain.keys() == weights.keys()
    assert max(float((plain[k] - weights[k]).abs().max()) for k in weights) > 1e-6

    # reloads onto the 4-bit base (as it trained) and onto the full-precision base (what merge.py merges into)
    ids = torch.tensor([[1, 5, 9, 14, 22, 31, 40, 2]])
    with torch.no_grad():
        for quantization in ("nf4", None):
            model = load_model(target["model"], final, dtype="float32", device="cpu", quantization=quantization)
            with_adapter = model(ids).logits
            with model.disable_adapter():
                without = model(ids).logits
            assert torch.isfinite(with_adapter).all() and (with_adapter - without).abs().max() > 1e-4


def test_load_in_4bit_with_lora_r_0_is_an_error_before_any_model_loads(target, tmp_path, capsys):
    code, err = run_script(forget_me_gd, base_args(target, tmp_path, "--load_in_4bit", "--lora_r", "0"), capsys)
    assert code == 2
    assert "error: --load_in_4bit with --lora_r 0: 4-bit weights cannot be trained" in err
    assert "Traceback" not in err and not (tmp_path / "adapter").exists()


def test_load_in_4bit_under_deepspeed_is_an_error(target, tmp_path, monkeypatch):
    args = parsed(target, tmp_path, "--load_in_4bit")
    with pytest.raises(UserError, match="--load_in_4bit under DeepSpeed: "):
        check_load_in_4bit(args, deepspeed=True)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(UserError, match="--load_in_4bit under DeepSpeed ZeRO-2: "):
        check_load_in_4bit(args)
    check_load_in_4bit(parsed(target, tmp_path))  # without the flag nothing is checked


def test_load_in_4bit_without_a_working_bitsandbytes_is_an_error(target, tmp_path, monkeypatch):
    args = parsed(target, tmp_path, "--load_in_4bit")
    check_load_in_4bit(args)  # this venv's bitsandbytes quantises on CPU

    def broken(*_args, **_kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", broken)
    with pytest.raises(UserError, match=r"cannot quantise to 4 bits on cpu here \(RuntimeError: no kernel"):
        check_load_in_4bit(args)
    monkeypatch.undo()
    # a None entry in sys.modules makes the import fail as a missing package does
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(UserError, match="--load_in_4bit needs bitsandbytes: pip install"):
        check_load_in_4bit(args)
    check_load_in_4bit(parsed(target, tmp_path))  # without the flag bitsandbytes is not needed
