"""Greedy decoding for evaluation, built for throughput on CPU.

``transformers``' ``generate`` keeps every row of a batch until the longest answer ends, grows its KV cache by
concatenation (a copy of the whole cache at every step) and, with a padding mask, repeats the grouped
key/value heads to the query heads' count before attention (another copy of the cache per layer per step).
On a CPU those copies cost more than the model's own matrix products once the batch is large. Here:

- rows leave the batch once enough of them have finished (``COMPACT_SHARE``) and the next prompts take
  their places (continuous batching), so a large batch stays full until the prompts run out;
- the KV cache is written in place into a buffer grown ``GROW_TOKENS`` positions at a time;
- on CPU, attention reads the grouped key/value heads directly (``enable_gqa``), bitwise the same result.

The continuation of a row depends on its own prompt only, up to float rounding (which depends on the
batch's shape): the same answers as ``generate``, faster at large batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

GROW_TOKENS = 64  # cache growth step: one copy of the cache every 64 generated tokens
COMPACT_SHARE = 0.25  # drop finished rows once they are this share of the batch (each drop copies the cache)

# Generation settings that change greedy decoding in ``generate`` (logits processors that run without
# sampling): a model whose generation_config sets one of them is decoded by ``generate`` itself.
GREEDY_PROCESSORS: dict[str, object] = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0, "min_new_tokens": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
    "guidance_scale": None, "renormalize_logits": False, "forced_decoder_ids": None,
}


# Architectures this decoder is tested on (tests/evals/test_decoding.py: the tiny Qwen2 model; the real-model
# tests: SmolLM2, a Llama). It skips ``prepare_inputs_for_generation`` (where some architectures adjust
# positions or RoPE scaling, e.g. Phi-3's LongRoPE), passes ``logits_to_keep`` and selects cache rows, which
# other architectures or cache types may not allow: they decode with ``generate``.
DECODER_ARCHITECTURES = frozenset({"llama", "qwen2"})


def decoder_unsupported(model) -> str | None:
    """Why :func:`greedy_decode` must not run ``model`` (``None`` when it may): an architecture outside
    :data:`DECODER_ARCHITECTURES`, or a model spread over several devices."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in DECODER_ARCHITECTURES:
        tested = ", ".join(sorted(DECODER_ARCHITECTURES))
        return f"architecture {model_type!r} is not among those our decoder is tested on ({tested})"
    if len(set(getattr(base, "hf_device_map", {}).values())) > 1:
        return "the model is spread over several devices"
    return None


def greedy_changed_by(generation_config) -> list[str]:
    """The settings of a model's ``generation_config`` that alter greedy decoding (empty: plain argmax)."""
    changed = []
    for name, default in GREEDY_PROCESSORS.items():
        value = getattr(generation_config, name, default)
        if value is not None and value != default and not (name == "guidance_scale" and value == 1.0):
            changed.append(name)
    return changed


# --------------------------------------------------------------------------- KV cache written in place


def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A full-attention cache layer whose keys and values live in a buffer with spare positions: an update
        writes into it (no concatenation); the buffer grows by ``GROW_TOKENS`` positions when full."""

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.length = 0
            self.key_buffer = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
            self.value_buffer = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[-1])
            self.keys, self.values = self.key_buffer, self.value_buffer
            self.is_initialized = True

        def _grow(self, end: int) -> None:
            capacity = -(-end // GROW_TOKENS) * GROW_TOKENS
            for name in ("key_buffer", "value_buffer"):
                old = getattr(self, name)
                new = old.new_empty(*old.shape[:2], capacity, old.shape[-1])
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(self, name, new)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.key_buffer.shape[-2]:
                self._grow(end)
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.select(indices, 0)

        def select(self, indices: torch.Tensor, start: int) -> None:
            """Keep the rows ``indices`` and the positions from ``start`` on (positions no kept row attends to
            are dropped, so that rows admitted later do not inherit an ever longer padded prefix)."""
            if not self.is_initialized:
                return
            length = self.length - start
            capacity = -(-max(length, 1) // GROW_TOKENS) * GROW_TOKENS
            for name in ("key_buffer", "value_buffer"):
                old = getattr(self, name)
                new = old.new_empty(len(indices), old.shape[1], capacity, old.shape[-1])
                new[:, :, :length] = old[indices, :, start : self.length]
                setattr(self, name, new)
            self.length = length
            self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("the decoding cache is not cropped")

        def append_rows(self, other: GrowingLayer) -> None:
            """Put ``other``'s rows below this layer's, both right-aligned on the longer one's length (the
            shorter one's left gap is zeros, masked by the caller's attention mask)."""
            length = max(self.length, other.length)
            buffers = []
            for mine, theirs in ((self.key_buffer, other.key_buffer), (self.value_buffer, other.value_buffer)):
                rows = mine.shape[0] + theirs.shape[0]
                merged = mine.new_zeros(rows, mine.shape[1], -(-length // GROW_TOKENS) * GROW_TOKENS, mine.shape[-1])
                merged[: mine.shape[0], :, length - self.length : length] = mine[:, :, : self.length]
                merged[mine.shape[0] :, :, length - other.length : length] = theirs[:, :, : other.length]
                buffers.append(merged)
            self.key_buffer, self.value_buffer = buffers
            self.length = length
            self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

    return GrowingLayer


def decoding_cache(model):
    """A ``DynamicCache`` for ``model`` whose full-attention layers are written in place (and can take new
    rows, :func:`_append_rows`); models with other layer kinds (sliding windows, linear attention) keep
    transformers' own layers."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        growing = _growing_layer_class()
        cache.layers = [growing() for _ in cache.layers]
    return cache


def _can_append_rows(cache) -> bool:
    return bool(cache.layers) and all(hasattr(layer, "append_rows") for layer in cache.layers)


def _select(cache, rows: torch.Tensor, start: int) -> None:
    """Keep ``rows`` of the cache, and its positions from ``start`` on where its layers allow."""
    if start and _can_append_rows(cache):
        for layer in cache.layers:
            layer.select(rows, start)
    else:
        cache.batch_select_indices(rows)


def _append_rows(cache, other) -> None:
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        mine.append_rows(theirs)


# --------------------------------------------------------------------------- grouped-query attention on CPU

GQA_ATTENTION = "sdpa_grouped_kv"


def _sdpa_grouped_kv(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """transformers' SDPA attention without ``repeat_kv``: torch's CPU kernel takes grouped key/value heads
    and a mask together (``enable_gqa``); transformers repeats them whenever there is a mask because CUDA's
    fast kernels do not."""
    if kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=bool(causal and attention_mask is None and query.shape[2] > 1),
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def grouped_kv_attention(model) -> Iterator[None]:
    """While active, a CPU model with SDPA attention attends with grouped key/value heads as they are (see
    :func:`_sdpa_grouped_kv`); other models and devices are left alone."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if (config is None or getattr(config, "_attn_implementation", None) != "sdpa" or base.device.type != "cpu"
            or not hasattr(base, "set_attn_implementation")):
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_ATTENTION, _sdpa_grouped_kv)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    base.set_attn_implementation(GQA_ATTENTION)
    try:
        yield
    finally:
        base.set_attn_implementation("sdpa")


# --------------------------------------------------------------------------- the decoding loop


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(tensor, (width - tensor.shape[1], 0))


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int,
                device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token lists left-padded to the longest (every prompt ends in the last column): input ids, attention
    mask and position ids (counting real tokens only), on ``device``."""
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


class _Batch:
    """The rows being decoded: their prompts' indices, attention mask (one column per cached position), next
    position, the token each row chose last (``pending``: recorded, not yet fed) and whether it finished."""

    def __init__(self, model, pad_id: int) -> None:
        self.model, self.pad_id, self.device = model, pad_id, model.device
        self.cache = None
        self.rows = torch.zeros(0, dtype=torch.long, device=self.device)
        self.mask = self.rows.new_zeros((0, 0))
        self.position = self.rows.new_zeros(0)
        self.pending = self.rows.new_zeros(0)
        self.done = torch.zeros(0, dtype=torch.bool, device=self.device)

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, indices: list[int], prompts: Sequence[Sequence[int]]) -> None:
        """Prefill the prompts ``indices`` (left-padded together) and add them as rows; their first tokens
        become pending."""
        input_ids, mask, position = left_padded([prompts[i] for i in indices], self.pad_id, self.device)
        cache = decoding_cache(self.model)
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        if len(self) == 0:  # a fresh batch: the prompts' cache and mask as they are
            self.cache, self.mask = cache, mask
        else:
            _append_rows(self.cache, cache)
            width = max(self.mask.shape[1], mask.shape[1])
            self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        self.rows = torch.cat([self.rows, torch.tensor(indices, device=self.device)])
        self.position = torch.cat([self.position, position[:, -1] + 1])
        self.pending = torch.cat([self.pending, logits.argmax(-1)])
        self.done = torch.cat([self.done, torch.zeros(len(indices), dtype=torch.bool, device=self.device)])

    def keep(self, kept: torch.Tensor) -> None:
        """Keep only the rows ``kept`` (their positions in the batch), and the cached positions from the first
        one a kept row attends to."""
        if len(kept) == len(self):
            return
        attended = self.mask[kept].any(dim=0).nonzero()
        start = int(attended[0]) if len(attended) and _can_append_rows(self.cache) else 0
        _select(self.cache, kept, start)
        self.rows, self.mask, self.position, self.pending, self.done = (
            self.rows[kept], self.mask[kept, start:], self.position[kept], self.pending[kept], self.done[kept])

    def step(self) -> None:
        """Feed every row's pending token; the next ones become pending."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        logits = self.model(input_ids=self.pending[:, None], attention_mask=self.mask,
                            position_ids=self.position[:, None], past_key_values=self.cache, use_cache=True).logits
        self.pending = logits[:, -1].argmax(-1)
        self.position = self.position + 1


@torch.no_grad()
def greedy_decode(model, prompts: Sequence[Sequence[int]], limits: Sequence[int], eos_ids: Collection[int],
                  pad_id: int, batch_size: int, on_finished: Callable[[int], None] | None = None,
                  on_tokens: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations of tokenised prompts, up to ``batch_size`` rows decoded together.

    Row ``i`` gets at most ``limits[i]`` (≥ 1) tokens and ends with the first token of ``eos_ids`` (kept, as
    ``generate`` keeps it). Once ``COMPACT_SHARE`` of the rows have finished they leave and the next prompts
    (in the given order; longest first wastes least padding) take their places: continuous batching, so the
    batch stays full until the prompts run out. ``on_finished(n)`` reports rows as they finish, ``on_tokens(n)``
    the tokens generated at each step (progress while no row finishes, e.g. an answer that loops).
    """
    if not prompts:
        return []
    device = model.device
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    limit = torch.tensor(list(limits), dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    count = torch.zeros(len(prompts), dtype=torch.long, device=device)
    queue = list(range(len(prompts)))[::-1]  # next prompt at the end
    batch = _Batch(model, pad_id)

    def record(at: torch.Tensor) -> None:
        """Append the pending tokens of the batch rows ``at`` (positions) to their answers."""
        rows, tokens = batch.rows[at], batch.pending[at]
        for row, token in zip(rows.tolist(), tokens.tolist(), strict=True):
            out[row].append(token)
        count[rows] += 1
        finishing = torch.isin(tokens, eos) | (count[rows] >= limit[rows])
        batch.done[at] = finishing
        if on_tokens is not None:
            on_tokens(len(rows))
        if on_finished is not None and (n := int(finishing.sum())):
            on_finished(n)

    with grouped_kv_attention(model):
        while True:
            finished = int(batch.done.sum())
            if finished == len(batch) or finished >= COMPACT_SHARE * len(batch):
                batch.keep((~batch.done).nonzero().squeeze(1))
                room = batch_size - len(batch)
                if queue and room > 0 and (len(batch) == 0 or _can_append_rows(batch.cache)):
                    start = len(batch)
                    batch.admit([queue.pop() for _ in range(min(room, len(queue)))], prompts)
                    record(torch.arange(start, len(batch), device=device))
                    continue  # some may have finished at once
                if len(batch) == 0:
                    break
            batch.step()
            record((~batch.done).nonzero().squeeze(1))
    return out
