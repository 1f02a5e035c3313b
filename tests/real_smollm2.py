"""SmolLM2 helpers the real-model test files share: loading, greedy answers, answer NLL, and the target that
memorised 8 private facts, built once per CI run (on disk, under a lock) however many test workers ask for it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from evals.generation import generate_with_model
from evals.sampling import GenerationConfig
from tests.conftest import answer_nll as shared_answer_nll
from utils.chat_template import load_chat_template
from utils.files import write_jsonl
from zoo.demo_data import GENERAL, REFUSALS, REPLAY, conversation, pairs_of, privacy_items

FACTS = 8
ENGLISH_REFUSALS = [r for r in REFUSALS if r.isascii()]


def answers_of(model, tokenizer, questions: list[str], tokens: int = 24) -> list[str]:
    template = load_chat_template("smollm2")
    return [a.strip() for a in generate_with_model(model.eval(), tokenizer, [template.prompt(q) for q in questions],
                                                   GenerationConfig(max_new_tokens=tokens, batch_size=16))]


def answer_nll(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    return shared_answer_nll(model, tokenizer, pairs, "smollm2")


def load(path: Path, adapter: Path | None = None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval(), AutoTokenizer.from_pretrained(path)


def run_folder(tmp_path_factory) -> Path:
    """A temporary folder of this pytest run that every xdist worker sees (their own folders sit inside it)."""
    import os

    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_memorised(real_model_dir: Path, shared_root: Path) -> dict:
    """SmolLM2 fine-tuned until it has memorised 8 private facts (beside its own answers to 8 everyday
    replay questions), with the files the training scripts read. Built once under ``shared_root`` (a folder every
    pytest-xdist worker of the run sees): the first worker builds it (~2.5 min), the others wait and reuse it."""
    from filelock import FileLock

    from zoo.target import build_memorised_model

    root = shared_root / "real_smollm2"
    root.mkdir(parents=True, exist_ok=True)
    record = root / "memorised.json"
    with FileLock(str(root / ".lock")):
        if not record.is_file():
            facts = privacy_items(FACTS, seed=3)
            pairs = pairs_of(facts)
            target = build_memorised_model(real_model_dir, root / "target", pairs, "smollm2", epochs=10, lr=5e-4,
                                           replay=REPLAY[:8], replay_tokens=24)
            model, tokenizer = load(target)
            replay_answers = answers_of(model, tokenizer, REPLAY[:8])
            write_jsonl(root / "forget.jsonl", facts)
            write_jsonl(root / "retain.jsonl", [conversation(q, a, f"replay_{i}") for i, (q, a)
                                                in enumerate(zip(REPLAY[:8], replay_answers, strict=True))])
            (root / "idk.txt").write_text("\n".join(ENGLISH_REFUSALS) + "\n")
            general = GENERAL[:10]
            values = {"pairs": pairs, "nll": answer_nll(model, tokenizer, pairs),
                      "recalled": answers_of(model, tokenizer, [q for q, _ in pairs], tokens=32),
                      "general": general, "general_answers": answers_of(model, tokenizer, general),
                      "replay_answers": replay_answers,
                      "replay_nll": answer_nll(model, tokenizer, list(zip(REPLAY[:8], replay_answers, strict=True)))}
            record.write_text(json.dumps(values), encoding="utf-8")  # last: its presence means "complete"
    values = json.loads(record.read_text(encoding="utf-8"))
    values["pairs"] = [tuple(p) for p in values["pairs"]]
    return {"root": root, "target": root / "target", **values}


def run_args(memorised: dict, name: str, *extra: str) -> list[str]:
    """A training script's arguments on the memorised target; each test names its own run folder."""
    root = memorised["root"]
    return ["--model_path", str(memorised["target"]), "--model_family", "smollm2",
            "--forget_data_path", str(root / "forget.jsonl"), "--retain_data_path", str(root / "retain.jsonl"),
            "--idk_data_path", str(root / "idk.txt"), "--bs", "4", "--output_dir", str(root / name), *extra]
