"""utils/loading.py: the one loader's dtype, device and trust rules, and every script loading through it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from utils.chat_template import load_chat_template
from utils.errors import UserError
from utils.loading import (
    FIT_SHARE,
    load_model,
    plan_placement,
    resolve_dtype,
    trusts_remote_code,
    weight_bytes,
    weights_dtype,
)

GIB = 2**30


def test_placement_one_gpu_when_it_fits_else_spread_over_the_gpus():
    """The transformers backend's --tensor_parallel_size used to be ignored: a model larger than one GPU went
    onto one GPU anyway. Now: one GPU when the weights fit (with room to spare), else device_map='auto' over
    the GPUs (the first tensor_parallel_size of them when asked), an error when even all cannot hold it."""
    free = [80 * GIB] * 4
    assert plan_placement(10 * GIB, free) == "cuda:0"
    assert plan_placement(10 * GIB, free, local_rank=2) == "cuda:2"
    spread = plan_placement(100 * GIB, free)
    assert isinstance(spread, dict) and sorted(spread) == [0, 1, 2, 3]
    assert all(v == int(FIT_SHARE * 80 * GIB) for v in spread.values())
    assert sorted(plan_placement(10 * GIB, free, tensor_parallel_size=2)) == [0, 1]  # asked for: 2 GPUs
    with pytest.raises(UserError, match="use more GPUs"):
        plan_placement(300 * GIB, free)
    with pytest.raises(UserError, match="only 4 GPU"):
        plan_placement(GIB, free, tensor_parallel_size=8)


def test_weight_bytes_reads_the_headers(target):
    model = load_model(target["model"], dtype="float32", device="cpu")
    count = sum(p.numel() for p in model.state_dict().values())
    assert weight_bytes(target["model"], torch.float32) == 4 * count
    assert weight_bytes(target["model"], torch.bfloat16) == 2 * count


def test_dtype_policy():
    assert resolve_dtype("auto") is torch.float32  # no CUDA here
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("fp8")
    # full fine-tuning in bf16 keeps float32 weights unless DeepSpeed keeps the float32 copy itself
    assert weights_dtype(True, trains_every_weight=True, deepspeed=False) is torch.float32
    assert weights_dtype(True, trains_every_weight=True, deepspeed=True) is torch.bfloat16
    assert weights_dtype(True, trains_every_weight=False, deepspeed=False) is torch.bfloat16
    assert weights_dtype(False, trains_every_weight=False, deepspeed=True) is torch.float32


def test_pickled_weights_are_refused(target, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((target["model"] / "config.json").read_text())
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="cannot load the model"):
        load_model(folder, device="cpu")


@pytest.fixture()
def remote_family(monkeypatch):
    """A family whose config says trust_remote_code: true (the tiny model's tags; the model has no code of its
    own, so trusting it is harmless here) and a record of every trust_remote_code the loader is given."""
    import utils.chat_template
    import utils.loading

    families = utils.chat_template.load_model_families()
    remote = dataclasses.replace(families["tiny"], family="remote", aliases=(), trust_remote_code=True)
    monkeypatch.setattr(utils.chat_template, "load_model_families", lambda path=None: {**families, "remote": remote})
    seen: list[bool] = []
    real = utils.loading.load_model

    def recording(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(utils.loading, "load_model", recording)
    return seen


def test_a_family_that_trusts_remote_code_is_trusted_by_every_script(target, trained_adapter, tmp_path,
                                                                     remote_family):
    """trust_remote_code from the family used to reach training only: such a model trained but could not be
    evaluated, predicted with or merged. One rule now, in every script."""
    import evaluate_unlearning
    import merge
    import predict_demo

    assert trusts_remote_code(False, load_chat_template("remote")) and not trusts_remote_code(False, None)
    evaluate_unlearning.main(["--model_path", str(target["model"]), "--model_family", "remote", "--forget",
                              str(target["forget"]), "--max_new_tokens", "4", "--gradnorm", "false", "--out",
                              str(tmp_path / "eval")])
    predict_demo.main(["--model_path", str(target["model"]), "--data_path", str(target["forget"]),
                       "--output_path", str(tmp_path / "pred.jsonl"), "--model_type", "remote",
                       "--prompt_format", "tags", "--backend", "transformers", "--max_new_tokens", "4"])
    run_args = trained_adapter.parent / "run_args.json"
    record = json.loads(run_args.read_text())
    run_args.write_text(json.dumps({**record, "model_family": "remote"}))
    try:
        merge.main(["--base_model", str(target["model"]), "--adapter", str(trained_adapter), "--output",
                    str(tmp_path / "merged")])
    finally:
        run_args.write_text(json.dumps(record))
    assert len(remote_family) == 3 and all(remote_family)


def test_the_transformers_backend_passes_tensor_parallel_size_to_the_loader(target, tmp_path, monkeypatch):
    """predict_demo.py --backend transformers --tensor_parallel_size 2 used to put the model on one GPU anyway:
    the size now reaches the loader, which spreads the model over that many GPUs (plan_placement; on this CPU
    machine it stays on the CPU)."""
    import predict_demo
    import utils.loading

    seen = []
    real = utils.loading.load_model

    def recording(*args, **kwargs):
        seen.append(kwargs.get("tensor_parallel_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(utils.loading, "load_model", recording)
    predict_demo.main(["--model_path", str(target["model"]), "--data_path", str(target["forget"]), "--output_path",
                       str(tmp_path / "p.jsonl"), "--model_type", "tiny", "--prompt_format", "tags", "--backend",
                       "transformers", "--max_new_tokens", "2", "--tensor_parallel_size", "2"])
    assert seen == [2]


def test_models_are_loaded_in_one_place():
    """No script or library module but utils/loading.py calls from_pretrained on a model class (the GGUF
    conversion of zoo/ reads a GGUF file, which the loader does not)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    allowed = {root / "utils" / "loading.py", root / "zoo" / "wheel_models.py"}
    pattern = re.compile(r"(AutoModelForCausalLM|PeftModel)\.from_pretrained\(")
    found = [str(p.relative_to(root)) for folder in ("", "utils", "dataset", "evals", "trainer", "zoo", "bench")
             for p in (root / folder).glob("*.py") if p not in allowed and pattern.search(p.read_text())]
    assert found == []


def test_quantised_loading_replaces_the_linear_layers_and_keeps_the_head(tiny_model_dir):
    """int8 and NF4 through bitsandbytes on CPU: every decoder linear becomes a bitsandbytes layer (the head stays,
    as transformers leaves it), the logits move but stay close; an unknown kind is one clear error."""
    import bitsandbytes as bnb

    full = load_model(tiny_model_dir, dtype="float32", device="cpu")
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        reference = full(input_ids=ids).logits
    for kind, layer in (("int8", bnb.nn.Linear8bitLt), ("nf4", bnb.nn.Linear4bit)):
        model = load_model(tiny_model_dir, dtype="float32", device="cpu", quantization=kind)
        linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
        assert linears and all(isinstance(m, layer) for m in linears), kind
        assert not isinstance(model.lm_head, layer)
        with torch.no_grad():
            change = (model(input_ids=ids).logits - reference).abs()
        assert 0 < change.mean() < reference.abs().mean(), kind
    with pytest.raises(UserError, match="quantisation must be one of int8, nf4, fp4"):
        load_model(tiny_model_dir, dtype="float32", device="cpu", quantization="int4")
