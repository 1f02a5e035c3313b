"""The GPU path on a real GPU, for the day a GPU machine is lent: `bash bench/gpu_check.sh` (under 8 minutes on
one GPU, nothing from the network, nothing outside the working tree). Skipped without CUDA.

Two models built from a config with random weights: Qwen2.5-0.5B's shape with its 151,936-entry vocabulary,
and a Llama shape whose tokenizer adds a BOS token. On the first, {LoRA bf16, full fine-tuning bf16, DeepSpeed
ZeRO-2, ZeRO-3} x {ME+GD, NPO+KL}, a few steps each: no crash, a saved folder with every weight, first-step
losses within bf16 tolerance of a float32 CPU run of the same steps. Then greedy answers of vLLM (when it is
installed there) and of the transformers backend under a generation_config with a repetition penalty, and the
training step's MFU (bench/bench_train_step.py, printed).

`GPU_CHECK_DRY_RUN=1` runs the same checks on CPU with small shapes (for developers without a GPU: it shakes
out everything but the device itself).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DRY = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() and not DRY,
                                 reason="needs a CUDA GPU (bash bench/gpu_check.sh on a lent GPU machine)")]

# bf16 against float32: relative tolerance of a first-step loss (bf16 has 8 bits of mantissa; a step's loss
# sums a few hundred tokens' terms computed from bf16 activations)
BF16_REL = 3e-2
QWEN = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
LLAMA = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
if DRY:  # the same architectures, small
    QWEN.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=4096)
    LLAMA.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096)


def env(cpu: bool = False) -> dict[str, str]:
    extra = {"CUDA_VISIBLE_DEVICES": ""} if cpu or DRY else {}
    if DRY:
        extra.update(DS_ACCELERATOR="cpu", VLLM_CPU_KVCACHE_SPACE="1")
    return {**os.environ, "OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            **extra}


def build(kind: str, folder: Path, texts: list[str]) -> Path:
    """A random model of ``kind`` (qwen / llama_bos) with a tokenizer trained on ``texts``, saved to ``folder``."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from zoo.tiny import build_tokenizer

    bos = kind == "llama_bos"
    tokenizer = build_tokenizer(texts, vocab_size=4096, bos_token="<|begin_of_text|>" if bos else None)
    shape = LLAMA if bos else QWEN
    common = dict(max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**common)) if bos else Qwen2ForCausalLM(Qwen2Config(**common))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False,
                                               repetition_penalty=1.05)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from utils.files import write_jsonl
    from zoo.demo_data import REFUSALS, definition_items, privacy_items

    root = tmp_path_factory.mktemp("gpu_check")
    forget, retain = privacy_items(8, seed=0), definition_items()[:8]
    write_jsonl(root / "forget.jsonl", forget)
    write_jsonl(root / "retain.jsonl", retain)
    (root / "idk.txt").write_text("\n".join(REFUSALS) + "\n")
    texts = [t["value"] for item in forget + retain for t in item["conversations"]]
    return {"root": root, "qwen": build("qwen", root / "qwen", texts),
            "llama": build("llama_bos", root / "llama", texts)}


def train(setup: dict, model: str, out: Path, mode: str, loss: str, cpu: bool = False) -> Path:
    """One short run (8 items, bs 2: 4 steps) of forget_me_gd.py in ``mode``; returns its run folder."""
    argv = ["forget_me_gd.py", "--model_path", str(setup[model]), "--model_family", "tiny", "--forget_data_path",
            str(setup["root"] / "forget.jsonl"), "--retain_data_path", str(setup["root"] / "retain.jsonl"),
            "--idk_data_path", str(setup["root"] / "idk.txt"), "--loss_type", loss, "--num_epochs", "1", "--bs", "2",
            "--max_length", "128", "--lr", "1e-4", "--lora_dropout", "0", "--save_steps", "0",
            "--save_root", str(out), "--bf16", "false" if cpu else "true"]
    if mode == "full_ft":
        argv += ["--lora_r", "0"]
    launch = [sys.executable]
    if mode in ("zero2", "zero3"):
        port = free_port()
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "accelerate_config.yaml"), "--num_processes", "1", "--mixed_precision", "bf16",
                  "--gradient_accumulation_steps", "1", "--main_process_port", str(port)]
        if mode == "zero3":
            launch += ["--zero_stage", "3", "--zero3_init_flag", "true", "--zero3_save_16bit_model", "true"]
        argv += ["--gradient_accumulation_steps", "1"]
    proc = subprocess.run([*launch, *argv], cwd=ROOT, env=env(cpu), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = out.iterdir()
    return run


def first_step(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return next(r for r in rows if "loss" in r)


@pytest.fixture(scope="module")
def cpu_reference(setup, tmp_path_factory) -> dict:
    """float32 CPU runs of the same steps (LoRA and full fine-tuning) for each loss."""
    root = tmp_path_factory.mktemp("cpu")
    return {(adapter, loss): first_step(train(setup, "qwen", root / f"{adapter}_{loss}", adapter, loss, cpu=True))
            for adapter in ("lora_bf16", "full_ft") for loss in ("ME+GD", "NPO+KL")}


@pytest.mark.parametrize("loss", ["ME+GD", "NPO+KL"])
@pytest.mark.parametrize("mode", ["lora_bf16", "full_ft", "zero2", "zero3"])
def test_training_modes_on_one_gpu(setup, cpu_reference, tmp_path, mode, loss):
    from trainer.saving import empty_weights

    run = train(setup, "qwen", tmp_path, mode, loss)
    final = run / ("final_model" if mode == "full_ft" else "final_lora_model")
    assert final.is_dir() and empty_weights(final) == []
    got, ref = first_step(run), cpu_reference[("full_ft" if mode == "full_ft" else "lora_bf16", loss)]
    for key in ("forget_loss", "retain_loss"):
        assert got[key] == pytest.approx(ref[key], rel=BF16_REL, abs=1e-3), (key, got[key], ref[key])
    print(f"{mode} {loss}: first-step forget {got['forget_loss']:.4f} (CPU fp32 {ref['forget_loss']:.4f}), "
          f"retain {got['retain_loss']:.4f} ({ref['retain_loss']:.4f})")


def test_bos_model_trains_and_merges(setup, tmp_path):
    """The Llama shape whose tokenizer adds a BOS: trains (LoRA bf16) and merges, the merged folder non-empty."""
    import merge

    run = train(setup, "llama", tmp_path / "run", "lora_bf16", "ME+GD")
    out = merge.main(["--base_model", str(setup["llama"]), "--adapter", str(run / "final_lora_model"),
                      "--output", str(tmp_path / "merged"), "--force"])
    assert list(out.glob("*.safetensors"))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed on this machine")
@pytest.mark.parametrize("model", ["qwen", "llama"])
def test_vllm_and_transformers_greedy_agree_under_a_repetition_penalty(setup, tmp_path, model):
    """Both backends start from the model's generation_config (repetition penalty 1.05): the same greedy answers."""
    common = ["predict_demo.py", "--model_path", str(setup[model]), "--data_path", str(setup["root"] / "forget.jsonl"),
              "--model_type", "tiny", "--prompt_format", "tags", "--max_new_tokens", "24", "--max_model_len", "512"]
    outs = {}
    for backend in ("vllm", "transformers"):
        outs[backend] = tmp_path / f"{backend}.jsonl"
        proc = subprocess.run([sys.executable, *common, "--backend", backend, "--output_path", str(outs[backend])],
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert outs["vllm"].read_text() == outs["transformers"].read_text()


def test_step_mfu_is_printed(setup):
    """The ME+GD training step on the Qwen2.5-0.5B shape: tokens/s, memory and MFU (bench_train_step.py)."""
    preset = [] if DRY else ["--preset", "qwen2.5-0.5b", "--bf16"]
    proc = subprocess.run([sys.executable, "bench/bench_train_step.py", *preset, "--steps", "3" if DRY else "10",
                           "--data", "demo", "--paths", "ours"], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    assert "tokens/s" in proc.stdout
