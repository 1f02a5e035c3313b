"""utils.fingerprint: what tells a model folder from a fine-tuned copy of the same name, and the record of it."""

from __future__ import annotations

import json
import shutil

import utils.fingerprint as fp


def fake_model(folder, weights: bytes, **config) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8, **config}))
    (folder / "model.safetensors").write_bytes(weights)


def test_a_copy_has_the_fingerprint_other_weights_or_config_do_not(tmp_path):
    weights = bytes(range(256)) * 4096  # 1 MiB: sampled in 16 chunks of 64 KiB, i.e. read whole
    fake_model(tmp_path / "base", weights, _name_or_path="/where/it/was")
    record = fp.model_fingerprint(tmp_path / "base")
    shutil.copytree(tmp_path / "base", tmp_path / "copy")
    (tmp_path / "copy" / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8,
                                                               "_name_or_path": "elsewhere"}))
    assert fp.fingerprint_difference(record, tmp_path / "copy") is None  # where it was loaded from does not count
    assert fp.same_model(tmp_path / "base", tmp_path / "copy")

    changed = bytearray(weights)
    changed[len(weights) // 2] ^= 1  # one byte, same size
    fake_model(tmp_path / "tuned", bytes(changed))
    assert fp.fingerprint_difference(record, tmp_path / "tuned") == "same config.json, other weights"
    assert not fp.same_model(tmp_path / "base", tmp_path / "tuned")
    fake_model(tmp_path / "wider", weights, hidden_size=16)
    assert fp.fingerprint_difference(record, tmp_path / "wider") == "its config.json differs"


def test_the_record_beside_an_adapter(tmp_path, monkeypatch):
    """Written for a local base (relative paths as training ran them), none for a hub id; read back; an unknown
    record is ignored, not trusted."""
    fake_model(tmp_path / "models" / "base", b"weights" * 1000)
    adapter = tmp_path / "run" / "final_lora_model"
    adapter.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "models/base"}))
    path = fp.record_base_fingerprint(adapter)
    assert path == adapter / fp.FINGERPRINT_FILE
    record = fp.read_base_fingerprint(adapter)
    assert record["base_model"] == "models/base" and record["resolved"] == str(tmp_path / "models" / "base")
    assert fp.fingerprint_difference(record, tmp_path / "models" / "base") is None
    assert list(adapter.parent.glob(".*")) == [] and list(adapter.glob(".*")) == []  # no temp file left

    path.write_text(json.dumps({"format": 99}))
    assert fp.read_base_fingerprint(adapter) is None
    path.unlink()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen2.5-7B"}))
    assert fp.record_base_fingerprint(adapter) is None and fp.read_base_fingerprint(adapter) is None
