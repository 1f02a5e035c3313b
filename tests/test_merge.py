"""merge.py: logits equal, files reload with plain transformers, refusals."""

from __future__ import annotations

import torch

import merge
from tests.conftest import run_script


def test_merge_round_trip(target, trained_adapter, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge.main(["--base_model", str(target["model"]), "--adapter", str(trained_adapter),
                      "--output", str(tmp_path / "merged"), "--max_shard_size", "200KB"])
    printed = capsys.readouterr().out
    assert "max |logit difference|" in printed
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()  # sharded as asked
    assert not list(out.glob("*.bin")) and not list(tmp_path.glob(".merged*"))  # no pickles, no temp left

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any("lora" in k for k in merged.state_dict())
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(target["model"]),
                                        str(trained_adapter)).eval()
    ids = tokenizer("What is the phone number of Gao Fang?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapter(ids).logits, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(target["model"])
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-3)  # the adapter did something


def test_merge_refuses_existing_output_without_overwrite(target, trained_adapter, tmp_path, capsys):
    existing = tmp_path / "merged"
    existing.mkdir()
    (existing / "keep.txt").write_text("my earlier model")
    argv = ["--base_model", str(target["model"]), "--adapter", str(trained_adapter), "--output", str(existing)]
    code, err = run_script(merge, argv, capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    merge.main([*argv, "--overwrite"])
    assert (existing / "config.json").is_file() and not (existing / "keep.txt").exists()


def test_merge_rejects_a_folder_that_is_not_an_adapter(target, tmp_path, capsys):
    code, err = run_script(merge, ["--base_model", str(target["model"]), "--adapter", str(target["model"]),
                                   "--output", str(tmp_path / "m")], capsys)
    assert code == 2 and "not a PEFT adapter folder" in err
    assert not (tmp_path / "m").exists()


def test_merge_refuses_another_base_unless_forced(target, trained_adapter, tmp_path, capsys):
    """A model of the same shape but other weights (the target fine-tuned one more step): refused, one line,
    nothing written; --force merges it. A byte-identical copy of the base elsewhere is accepted."""
    import shutil

    from transformers import AutoModelForCausalLM

    other = tmp_path / "other_model"
    model = AutoModelForCausalLM.from_pretrained(target["model"])
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    model.save_pretrained(other)
    shutil.copy(target["model"] / "tokenizer.json", other / "tokenizer.json")
    argv = ["--base_model", str(other), "--adapter", str(trained_adapter), "--output", str(tmp_path / "m")]
    capsys.readouterr()  # the test's own loading output
    code, err = run_script(merge, argv, capsys)
    assert code == 2 and "differs from --base_model" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
    assert merge.main([*argv, "--force"]).is_dir()

    copy = tmp_path / "copy_of_base"
    shutil.copytree(target["model"], copy)
    assert merge.main(["--base_model", str(copy), "--adapter", str(trained_adapter),
                       "--output", str(tmp_path / "m2")]).is_dir()


def test_merge_refuses_an_adapter_that_changes_nothing(target, tmp_path, capsys):
    """A freshly initialised LoRA (B = 0) merges into the base unchanged: refused unless --force."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(target["model"]),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    fresh.save_pretrained(tmp_path / "fresh")
    argv = ["--base_model", str(target["model"]), "--adapter", str(tmp_path / "fresh"), "--output",
            str(tmp_path / "m")]
    code, err = run_script(merge, argv, capsys)
    assert code == 2 and "changes nothing" in err and not (tmp_path / "m").exists()
    assert merge.main([*argv, "--force"]).is_dir()


def test_merge_runs_in_float32_and_refuses_a_change_that_rounds_away(target, trained_adapter, tmp_path, capsys):
    """An adapter whose weight changes are far below bfloat16's resolution (LoRA B scaled by 1e-3): merged in
    float32 it is still there (the base's own dtype, float32 here, is the default); saved in bfloat16 it rounds
    away into the model's own rounding, and merge says so instead of writing a model close to the base (before:
    merged in bf16 and checked at tolerance 0.25, which any such model passes)."""
    import shutil

    from safetensors.torch import load_file, save_file

    small = tmp_path / "run" / "final_lora_model"
    shutil.copytree(trained_adapter.parent, tmp_path / "run", dirs_exist_ok=True)
    weights = load_file(small / "adapter_model.safetensors")
    save_file({k: v * 1e-3 if "lora_B" in k else v for k, v in weights.items()}, small / "adapter_model.safetensors")
    argv = ["--base_model", str(target["model"]), "--adapter", str(small)]

    code, err = run_script(merge, [*argv, "--output", str(tmp_path / "bf16"), "--dtype", "bfloat16"], capsys)
    assert code == 2 and "keeps only" in err and "--dtype float32" in err and not (tmp_path / "bf16").exists()

    out = merge.main([*argv, "--output", str(tmp_path / "fp32")])
    assert "the adapter's effect kept in float32: 100.0%" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32
    base = AutoModelForCausalLM.from_pretrained(target["model"])
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed  # the small change is in the saved weights


def test_merge_checks_on_the_adapters_own_forget_items(trained_adapter):
    """The probes are the adapter's first forget items as training formatted them (from its run_args.json), not
    one English sentence; without a run record, the sentence."""
    from dataset.reading import load_qa_jsonl
    from utils.chat_template import load_chat_template

    record = merge.run_record(trained_adapter)
    probes = merge.probe_texts(trained_adapter, record)
    items = load_qa_jsonl(record["forget_data_path"])[: merge.PROBE_ITEMS]
    template = load_chat_template("tiny")
    assert probes == [template.prompt(it.question) + it.answer for it in items] and len(probes) == 8
    assert merge.probe_texts(trained_adapter, {}) == [merge.PROBE]


def impostor_of(base, folder):
    """A model with ``base``'s config and tokenizer, every weight moved a little (as a fine-tune moves them)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, folder)
    for file in folder.glob("*.safetensors"):
        save_file({k: v + 0.01 for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    return folder


def adapter_recording(trained_adapter, folder, base_path: str, fingerprint: bool):
    """A copy of ``trained_adapter`` (with its run record) whose adapter_config.json names ``base_path``, with
    or without the base fingerprint training recorded."""
    import json
    import shutil

    from utils.fingerprint import FINGERPRINT_FILE

    shutil.copytree(trained_adapter.parent, folder)
    adapter = folder / trained_adapter.name
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base_path}))
    if not fingerprint:
        (adapter / FINGERPRINT_FILE).unlink()
    return adapter


def test_merge_from_another_directory_finds_the_base_relative_to_the_adapter(target, trained_adapter, tmp_path,
                                                                              monkeypatch, capsys):
    """No fingerprint recorded, the base path relative: run from an unrelated directory, the path is resolved
    against the adapter's folder too and the weights compared, so a fine-tuned model of the same folder name and
    config is refused (before: not found from here, the names agreed, it merged), the right base merges."""
    import os
    import shutil

    base = tmp_path / "models" / "tiny"
    shutil.copytree(target["model"], base)
    other = impostor_of(target["model"], tmp_path / "finetuned" / "tiny")
    run = tmp_path / "runs" / "r"
    relative = os.path.relpath(base, run / trained_adapter.name)  # ../../../models/tiny
    adapter = adapter_recording(trained_adapter, run, relative, fingerprint=False)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert (other / "config.json").read_text() == (base / "config.json").read_text()

    argv = ["--adapter", str(adapter), "--output", str(tmp_path / "m")]
    code, err = run_script(merge, ["--base_model", str(other), *argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
    assert f"differs from --base_model {other}" in err and "relative to the adapter's folder" in err
    assert str(base) in err and "--force" in err
    assert merge.main(["--base_model", str(base), *argv]).is_dir()


def test_merge_checks_the_base_fingerprint_recorded_at_training(target, trained_adapter, tmp_path, monkeypatch,
                                                                capsys):
    """Training wrote the base's fingerprint beside the adapter; where the recorded path resolves nowhere (a
    relative path, run from elsewhere) the fingerprint still tells the base from a same-named fine-tune."""
    from utils.fingerprint import FINGERPRINT_FILE, fingerprint_difference, read_base_fingerprint

    record = read_base_fingerprint(trained_adapter)  # what training itself wrote (trainer/saving.py)
    assert record is not None and record["resolved"] == str(target["model"].resolve())
    assert fingerprint_difference(record, target["model"]) is None
    other = impostor_of(target["model"], tmp_path / "finetuned" / target["model"].name)
    adapter = adapter_recording(trained_adapter, tmp_path / "run", f"gone/{target['model'].name}", fingerprint=True)
    monkeypatch.chdir(tmp_path)

    argv = ["--adapter", str(adapter), "--output", str(tmp_path / "m")]
    code, err = run_script(merge, ["--base_model", str(other), *argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
    assert f"differs from --base_model {other}" in err and FINGERPRINT_FILE in err
    assert "same config.json, other weights" in err and str(target["model"].resolve()) in err
    assert merge.main(["--base_model", str(target["model"]), *argv]).is_dir()


def test_an_unverifiable_base_is_accepted_by_name_with_a_warning(target, trained_adapter, tmp_path, monkeypatch,
                                                                 caplog):
    """No fingerprint and a recorded path that resolves nowhere: the folder names decide, as before, and merge
    warns that the base could not be verified; other names are refused."""
    import logging
    import shutil

    adapter = adapter_recording(trained_adapter, tmp_path / "run", f"gone/{target['model'].name}", fingerprint=False)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="merge"):
        assert merge.base_mismatch(target["model"], adapter) is None
    assert "could not verify" in caplog.text
    other_name = tmp_path / "other_name"
    other_name.mkdir()
    shutil.copy(target["model"] / "config.json", other_name)
    assert "the names differ" in merge.base_mismatch(other_name, adapter)
