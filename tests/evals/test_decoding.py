"""Greedy decoding (evals/decoding.py): the tokens of plain greedy forwards, whatever the batch."""

from __future__ import annotations

import pytest
import torch

from evals.decoding import GROW_TOKENS, decoding_cache, greedy_changed_by, greedy_decode, grouped_kv_attention
from evals.generation import budgets_by_batch_width, generate_with_model
from evals.sampling import GenerationConfig


def reference(model, prompt: list[int], limit: int, eos: set[int]) -> list[int]:
    """Greedy tokens from whole forwards of the prompt alone (no cache, no padding), through the first EOS."""
    sequence, tokens = list(prompt), []
    with torch.no_grad():
        while len(tokens) < limit:
            tokens.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
            sequence.append(tokens[-1])
            if tokens[-1] in eos:
                break
    return tokens


PROMPTS = [[5, 17, 22, 9, 31, 40, 12], [7, 8], [100, 101, 102, 103], [3], [64, 65, 66, 67, 68, 69], [11, 12, 13]]
LIMITS = [GROW_TOKENS + 6, 9, 12, 5, 20, 15]  # the first row outgrows one cache block


def test_same_tokens_as_plain_greedy_with_rows_joining_and_leaving(tiny_model):
    """Six prompts of different lengths and budgets, at most 2 rows at a time: rows finish at different steps
    (budget or EOS), leave, and the next prompts join a batch already under way (left-aligned on the cache,
    which is trimmed as old rows leave). Each row's tokens equal whole greedy forwards of that prompt alone. EOS is a
    token that the unconstrained continuations emit part-way, so some rows end on it (and keep it)."""
    model = tiny_model.eval()
    free = [reference(model, p, n, set()) for p, n in zip(PROMPTS, LIMITS, strict=True)]
    eos = {free[0][3], free[4][10]}  # ends row 0 at step 3 or before and row 4 by step 10
    expected = [reference(model, p, n, eos) for p, n in zip(PROMPTS, LIMITS, strict=True)]
    assert any(len(e) < n for e, n in zip(expected, LIMITS, strict=True))  # some rows end on EOS
    assert any(len(e) == n for e, n in zip(expected, LIMITS, strict=True))  # some run out of budget
    finished = []
    for batch_size in (1, 2, 6):
        got = greedy_decode(model, PROMPTS, LIMITS, eos, pad_id=0, batch_size=batch_size, on_finished=finished.append)
        assert got == expected, batch_size
    assert sum(finished) == 3 * len(PROMPTS)


def test_cache_grows_and_takes_rows(tiny_model):
    """The cache holds every fed position: after decoding one row for GROW_TOKENS + 6 tokens it spans the
    prompt and all but the last token, in a buffer grown past one block."""
    model = tiny_model.eval()
    cache = decoding_cache(model)
    assert all(hasattr(layer, "append_rows") for layer in cache.layers)
    with torch.no_grad():
        model(input_ids=torch.tensor([PROMPTS[0]]), past_key_values=cache, use_cache=True)
        for t in range(GROW_TOKENS + 5):
            model(input_ids=torch.tensor([[t + 1]]), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == len(PROMPTS[0]) + GROW_TOKENS + 5
    assert cache.layers[0].key_buffer.shape[-2] == 2 * GROW_TOKENS


def test_grouped_kv_attention_same_logits_and_restored(tiny_model):
    """With a padding mask, attention over grouped key/value heads as they are gives the logits of
    transformers' SDPA path (which repeats them); the model's attention setting is restored afterwards."""
    model = tiny_model.eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped heads really
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with grouped_kv_attention(model):
            assert model.config._attn_implementation != "sdpa"
            grouped = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(grouped[mask.bool()], plain[mask.bool()], rtol=1e-5, atol=1e-5)


def test_greedy_changing_settings_are_named():
    from transformers import GenerationConfig as HFConfig

    assert greedy_changed_by(HFConfig()) == []
    assert greedy_changed_by(HFConfig(repetition_penalty=1.05, suppress_tokens=[3])) == ["repetition_penalty",
                                                                                           "suppress_tokens"]


def test_repetition_penalty_decoded_by_generate(tiny_model, tokenizer):
    """A model whose generation_config sets a repetition penalty is decoded by generate with it: its answer
    is generate's, and differs from plain greedy decoding's on this prompt."""
    model = tiny_model.eval()
    prompt = "hello world hello"
    config = GenerationConfig(max_new_tokens=24, batch_size=2)
    plain = generate_with_model(model, tokenizer, [prompt], config)
    model.generation_config.repetition_penalty = 5.0
    penalised = generate_with_model(model, tokenizer, [prompt], config)
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=24, pad_token_id=0,
                             top_k=None, temperature=None, top_p=None)
    assert penalised == [tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)]
    assert penalised != plain


def test_budgets_by_batch_width(tokenizer):
    """Batches of 2 in order: prompt lengths (a, b) and (c, d) get max_length - max(a, b) and - max(c, d)."""
    prompts = ["one", "one two three four", "one two", "one two three"]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    budgets = budgets_by_batch_width(tokenizer, prompts, 30, 2)
    assert budgets == [30 - max(lengths[:2])] * 2 + [30 - max(lengths[2:])] * 2
    assert budgets[0] != budgets[2]


def test_per_prompt_budgets(tiny_model, tokenizer):
    """Each answer is the plain greedy continuation of its prompt cut at its own budget (or at EOS), a budget
    below 1 gives an empty answer, and an answer does not change with the prompts beside it."""
    from evals.generation import _stop_ids

    model = tiny_model.eval()
    prompts = ["a b c", "d e", "f g h i j", "k"]
    budgets = [3, 0, 7, 5]
    config = GenerationConfig(batch_size=2)
    answers = generate_with_model(model, tokenizer, prompts, config, max_new_tokens=budgets)
    for prompt, budget, answer in zip(prompts, budgets, answers, strict=True):
        tokens = reference(model, tokenizer(prompt)["input_ids"], budget, set(_stop_ids(model, tokenizer)))
        assert answer == tokenizer.decode(tokens, skip_special_tokens=True)
    assert answers[1] == "" and answers[0] != answers[2]
    alone = generate_with_model(model, tokenizer, prompts[2:3], config, max_new_tokens=[7])
    assert alone == answers[2:3]
    with pytest.raises(ValueError, match="2 token budgets for 4 prompts"):
        generate_with_model(model, tokenizer, prompts, config, max_new_tokens=[1, 2])


def test_generate_decoder_gives_the_same_answers(tiny_model, tokenizer):
    """decoder="generate" (transformers' own loop, the bench's comparison) answers as ours does."""
    model = tiny_model.eval()
    prompts = ["a b c", "d e f g h", "k"]
    ours = generate_with_model(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12, batch_size=2))
    theirs = generate_with_model(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12, batch_size=2,
                                                                              decoder="generate"))
    assert ours == theirs and len(set(ours)) == 3


def test_architectures_outside_the_allow_list_decode_with_generate(tiny_model, tokenizer, monkeypatch, caplog):
    """Our decoder skips prepare_inputs_for_generation, passes logits_to_keep and selects cache rows in place:
    it runs only on the architectures it is tested on (DECODER_ARCHITECTURES); any other (here the tiny model
    relabelled phi3, whose LongRoPE resets positions) decodes with generate, said in the log, same answers.
    The shared-prompt scorer falls back to plain forwards for it the same way."""
    import logging

    import evals.decoding
    from evals.answer_nll import prompt_shared_nll
    from evals.decoding import DECODER_ARCHITECTURES, decoder_unsupported

    model = tiny_model.eval()
    prompts = ["<|im_start|>user\nwho wrote the book<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nhi"]
    config = GenerationConfig(max_new_tokens=8, batch_size=2)
    ours = generate_with_model(model, tokenizer, prompts, config)
    samples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
               {"input_ids": [5, 6, 7, 3], "labels": [-100, -100, 7, 3]}]
    shared = prompt_shared_nll(model, samples, 0, 4)
    assert "qwen2" in DECODER_ARCHITECTURES and decoder_unsupported(model) is None

    monkeypatch.setattr(model.config, "model_type", "phi3")
    assert "phi3" in decoder_unsupported(model)

    def refuse(*args, **kwargs):
        raise AssertionError("our decoder ran on an architecture outside its allow-list")

    monkeypatch.setattr(evals.decoding, "greedy_decode", refuse)
    monkeypatch.setattr(evals.decoding, "decoding_cache", refuse)
    with caplog.at_level(logging.INFO, logger="evals.generation"):
        assert generate_with_model(model, tokenizer, prompts, config) == ours
    assert "generate" in caplog.text and "phi3" in caplog.text
    plain = prompt_shared_nll(model, samples, 0, 4)
    assert [n for _, n in plain] == [n for _, n in shared]
    assert [s for s, _ in plain] == pytest.approx([s for s, _ in shared], rel=1e-5)
