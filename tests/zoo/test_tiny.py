"""The tiny model and tokenizer the tests build (zoo/tiny.py): reload and tokenise as built."""

from __future__ import annotations

import json


def test_tiny_model_reloads_as_it_was_built(tiny_model_dir, tokenizer, tiny_model):
    """The fixture folder reloads through the Auto classes into the model zoo.tiny builds (same logits as a fresh
    build with the same seed) and its generation stops at <|im_end|>."""
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["hidden_size"] // cfg["num_attention_heads"] >= 32
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tiny_model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    import torch

    from zoo.tiny import build_model

    ids = tokenizer("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, build_model(tokenizer, seed=0)(ids).logits)
        assert not torch.equal(tiny_model(ids).logits, build_model(tokenizer, seed=1)(ids).logits)


def test_reloaded_tokenizer_splits_like_the_built_one(tiny_model_dir, tokenizer):
    """AutoTokenizer reloads a qwen2 folder as Qwen2Tokenizer; it must tokenise exactly as the built one."""
    from zoo.tiny import build_tokenizer

    built = build_tokenizer()
    text = "The phone of Gao Fang is 170-7153-2424. 我不知道。\n<|im_start|>user\nHi<|im_end|>"
    assert built(text).input_ids == tokenizer(text).input_ids
