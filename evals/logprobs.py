"""Per-token log-likelihood of labelled tokens: the one place both the training losses (`trainer.losses`) and
the evaluation metrics (`evals.tofu`) compute it.

Labels are aligned with the inputs (as a Hugging Face causal LM takes them): position ``t`` of the logits
predicts label ``t + 1``. Labels equal to ``IGNORE_INDEX`` count for nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from dataset.data_module import IGNORE_INDEX
from evals.shard import SINGLE, Shard

__all__ = ["FUSABLE_ARCHITECTURES", "IGNORE_INDEX", "ME_FLOOR", "HeadInput", "accepts_logits_to_keep", "fusable_head",
           "gathered", "head_input_taken", "head_token_values", "kept_positions", "me_chunk", "position_stats",
           "prompt_shared_nll", "qa_batches", "sequence_nll", "shift_labels", "token_nll", "upcast", "whole_shape"]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast to float32 for the reductions; float32/64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels moved one step left (``IGNORE_INDEX`` at the end): position t of the logits predicts label t + 1.

    Shifting the labels rather than slicing the logits keeps the logits a contiguous view: slicing them
    would copy ``B x T x V`` values forward and fill a zero ``B x T x V`` gradient backward.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)


# --------------------------------------------------------------------------- logits that are never built whole

# Positions per chunk of the fused head: bounds the float32 temporaries to HEAD_CHUNK_TOKENS x V at a time.
HEAD_CHUNK_TOKENS = 256


class HeadInput:
    """Logits ``(B, K, V)`` held as what makes them: the output head's input ``hidden (B, K, H)`` and its frozen
    weight ``(V, H)``. Per-token losses read them through :func:`token_nll` and :func:`head_token_values`,
    which run the head chunk by chunk, so neither the logits nor their gradient ever exist whole.

    Stands in for a logits tensor where a loss only needs per-token NLL or entropy-like values (the trainer
    decides, see ``LossTerm.fusable``): ``size`` reports the logits' shape, ``sum`` connects an empty
    selection's zero to the graph.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        self.hidden, self.weight = hidden, weight

    def size(self, dim: int | None = None):
        shape = torch.Size((*self.hidden.shape[:-1], whole_shape(self.weight)[0]))
        return shape if dim is None else shape[dim]

    def sum(self) -> torch.Tensor:
        return self.hidden.sum()


# Architectures whose logits are exactly ``lm_head(hidden)`` (no soft-capping or scaling after the head): the
# fused head may stand in for their logits. Gemma-3's text model has no final soft-capping (Gemma-2's had):
# tests/test_real_gemma.py holds the equality on the real model.
FUSABLE_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "mistral", "phi3", "qwen2_moe", "qwen3_moe",
                                   "gemma3_text"})


def whole_shape(weight: torch.Tensor) -> torch.Size:
    """A weight's full shape, also when DeepSpeed ZeRO-3 holds only this process's slice of it (``ds_shape``)."""
    return torch.Size(getattr(weight, "ds_shape", weight.shape))


@contextmanager
def gathered(weight: torch.Tensor) -> Iterator[torch.Tensor]:
    """The whole ``weight`` while active: under DeepSpeed ZeRO-3 (a partitioned parameter, ``ds_id``) its slices
    are gathered from every process (read-only) and released afterwards; any other tensor is itself."""
    if getattr(weight, "ds_id", None) is None:
        yield weight
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        yield weight


def fusable_head(model: torch.nn.Module | None, inference: bool = False) -> torch.nn.Linear | None:
    """The model's output head when per-token losses may be computed from its input (frozen, bias-free plain
    ``Linear``, an architecture in ``FUSABLE_ARCHITECTURES``), else ``None``. Under DeepSpeed ZeRO-3 the head's
    weight is a slice on each process; the losses gather it whole for their chunks (:func:`gathered`).
    ``inference``: the values are computed without gradients, so a trainable head is fine too."""
    if model is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if (type(head) is not torch.nn.Linear or head.bias is not None or (head.weight.requires_grad and not inference)
            or whole_shape(head.weight).numel() == 0 or model_type not in FUSABLE_ARCHITECTURES):
        return None
    return head


@contextmanager
def head_input_taken(head: torch.nn.Linear) -> Iterator[list[torch.Tensor]]:
    """While active, every call of ``head`` records its input in the yielded list and computes one position
    only: the model's own logits shrink to ``B x 1 x V``; the recorded input makes a :class:`HeadInput`."""
    taken: list[torch.Tensor] = []

    def take(module, args):
        taken.append(args[0])
        return (args[0][..., :1, :], *args[1:])

    # prepended: the input is taken before other pre-hooks (DeepSpeed ZeRO-3 wraps a module's inputs for its
    # backward bookkeeping; the taken input must bypass the head, whose output no loss reads)
    handle = head.register_forward_pre_hook(take, prepend=True)
    try:
        yield taken
    finally:
        handle.remove()


# The competition's ME: KL(uniform || softmax(z) + 1e-12), the floor inside the log. It caps each entry's -log p at
# 27.6 and gives every entry with p << 1e-12 no gradient; 0 is the exact closed form.
ME_FLOOR = 1e-12


def me_chunk(z: torch.Tensor, floor: float = ME_FLOOR, want_grad: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of logits ``z`` (C, V): ``KL(u || p + floor) = -log V - mean_v log(p_v + floor)`` with
    ``p = softmax(z)``, and its gradient with respect to ``z`` (C, V).

    With ``floor = 0`` this is ``logsumexp(z) - mean(z) - log V`` with gradient ``p - 1/V``. With a floor, writing
    ``r_v = p_v / (p_v + floor)`` and ``R = sum_v r_v``, the gradient is ``(p R - r) / V`` (the chain rule through
    the softmax): entries far below the floor have ``r ~ 0`` and no pull of their own. ``log(p + floor)`` is
    ``logaddexp(log p, log floor)``, exact for every p.
    """
    vocab = z.size(-1)
    logp = torch.log_softmax(z, dim=-1)
    if floor == 0:
        values = -logp.mean(dim=-1) - math.log(vocab)
        return values, (logp.exp_() - 1.0 / vocab) if want_grad else None
    lq = torch.logaddexp(logp, logp.new_tensor(math.log(floor)))
    values = -lq.mean(dim=-1) - math.log(vocab)
    if not want_grad:
        return values, None
    r = (logp - lq).exp_()
    total = r.sum(dim=-1, keepdim=True)
    grad = logp.exp_().mul_(total).sub_(r).div_(vocab)
    return values, grad


class _HeadTokenValues(torch.autograd.Function):
    """Per-row values of ``z = h W^T`` (rows of ``h`` are positions), ``z`` made ``HEAD_CHUNK_TOKENS`` rows at a
    time: ``nll`` = logsumexp(z) - z_y; ``me`` = KL(uniform || softmax(z) + floor) (:func:`me_chunk`).

    Each value's gradient with respect to its row of ``h`` (``(softmax(z) - onehot(y)) W``, or ME's logit gradient
    times ``W``) is made in the same pass and kept (``N x H``, small); backward scales it by the incoming per-row
    gradient. ``W`` must be frozen (no gradient is formed for it).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kind: str,
                floor: float = ME_FLOOR):
        values = torch.empty(hidden.size(0), dtype=upcast(hidden[:0]).dtype, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.size(0), HEAD_CHUNK_TOKENS):
            rows = slice(start, start + HEAD_CHUNK_TOKENS)
            # (C, V): the vocabulary-wide tensors, one chunk at a time
            z = upcast(hidden[rows] @ weight.t())
            if kind == "me":
                values[rows], probs = me_chunk(z, floor, grad is not None)
            else:
                z -= z.max(dim=-1, keepdim=True).values  # as log_softmax: exact where z is its maximum
                y = targets[rows]
                picked = z.gather(1, y.unsqueeze(1)).squeeze(1)
                probs = z.exp_()
                total = probs.sum(dim=-1)
                values[rows] = total.log() - picked
                if grad is not None:
                    probs /= total.unsqueeze(1)  # softmax(z)
                    probs[torch.arange(probs.size(0), device=probs.device), y] -= 1.0
            if grad is not None:
                grad[rows] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        return values

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_values.unsqueeze(1).to(grad.dtype), None, None, None, None


def head_token_values(head: HeadInput, labels: torch.Tensor, kind: str, floor: float = ME_FLOOR
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``nll`` or ``me`` (see :class:`_HeadTokenValues`) at the counted positions, as ``(B, T)`` values
    (0 elsewhere) and the counted mask, computed from ``head`` without whole logits."""
    target = shift_labels(labels)
    mask = target != IGNORE_INDEX
    flat = head.hidden.reshape(-1, head.hidden.size(-1))
    rows = mask.reshape(-1).nonzero().squeeze(1)
    with gathered(head.weight) as weight:
        values = _HeadTokenValues.apply(flat.index_select(0, rows), weight, target.reshape(-1)[rows], kind, floor)
    out = torch.zeros(target.shape, dtype=values.dtype, device=values.device)
    return out.index_put((mask,), values), mask


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM's forward takes ``logits_to_keep`` (the output head then runs at chosen positions
    only); older or custom architectures compute every position."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def kept_positions(labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Positions whose logits some loss reads, and the labels re-aligned to them.

    Position p is needed when some row has a label at p + 1. The output head (``hidden x vocab`` per position,
    the largest matmul of a small model) then runs only there: masked questions and padding cost nothing. The
    last position is kept as the shift's spare, so the kept logits and the re-aligned labels keep the losses'
    convention (logit j predicts label j + 1). ``None`` (every position) when nearly all are needed.
    """
    needed = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # (K,)
    length = labels.size(1)
    if needed.numel() + 1 >= length:
        return None, labels
    keep = torch.cat([needed, needed.new_tensor([length - 1])])
    spare = labels.new_full((labels.size(0), 1), IGNORE_INDEX)
    return keep, torch.cat([spare, labels[:, needed + 1]], dim=1)


@torch.no_grad()
def position_stats(rows: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row (one position each): ``log p(target)``, the mean and standard deviation of ``log p`` under ``p``
    (Min-K%++'s moments) and the argmax, with ``p = softmax(z)``. ``rows`` are logits ``(N, V)``, or with the
    head's ``weight`` its input ``(N, H)``; either way only ``HEAD_CHUNK_TOKENS x V`` values exist at a time."""
    out = [torch.empty(rows.size(0), dtype=torch.float32, device=rows.device) for _ in range(3)]
    argmax = torch.empty(rows.size(0), dtype=torch.long, device=rows.device)
    with gathered(weight) if weight is not None else contextlib.nullcontext() as whole:
        for start in range(0, rows.size(0), HEAD_CHUNK_TOKENS):
            chunk = slice(start, start + HEAD_CHUNK_TOKENS)
            z = upcast(rows[chunk] @ whole.t() if whole is not None else rows[chunk]).float()
            argmax[chunk] = z.argmax(dim=-1)
            logp = torch.log_softmax(z, dim=-1)
            out[0][chunk] = logp.gather(1, targets[chunk].unsqueeze(1)).squeeze(1)
            p = logp.exp()
            mu = (p * logp).sum(-1)
            out[1][chunk] = mu
            out[2][chunk] = ((p * logp.square_()).sum(-1) - mu.square()).clamp(min=0).sqrt()
    return out[0], out[1], out[2], argmax


def token_nll(logits: torch.Tensor | HeadInput, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (0 where ignored) and the mask of counted tokens, both ``(B, T)``."""
    if isinstance(logits, HeadInput):
        return head_token_values(logits, labels, "nll")
    target = shift_labels(labels)
    nll = F.cross_entropy(
        upcast(logits.reshape(-1, logits.size(-1))), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(target.shape)
    return nll, target != IGNORE_INDEX


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL of each sequence's counted tokens, shape ``(B,)`` (= -log p(answer | prompt))."""
    nll, _ = token_nll(logits, labels)
    return nll.sum(dim=-1)


def qa_batches(model, tokenizer, template, pairs, batch_size: int, max_length: int, shard: Shard = SINGLE):
    """(question, answer) pairs as training formats them (question masked), collated in batches on the
    model's device; yields ``(item indices, batch)``, only the batches this process of ``shard`` owns. A
    question that leaves no room for its answer is a :class:`~utils.utils.UserError`."""
    from dataset.data_module import ForgetRetainCollator, encode_qa
    from utils.loading import pad_id_of
    from utils.utils import UserError

    samples = []
    for q, a in pairs:
        sample = encode_qa(tokenizer, template, q, a, max_length, mask=True)
        if sample is None:
            raise UserError(f"question longer than {max_length} tokens: {q[:80]!r}")
        samples.append({"x": sample})
    collate = ForgetRetainCollator(pad_id_of(tokenizer))
    for number, start in enumerate(range(0, len(samples), batch_size)):
        if not shard.owns(number):
            continue
        batch = collate(samples[start : start + batch_size])["x"]
        yield range(start, start + len(batch["input_ids"])), {k: v.to(model.device) for k, v in batch.items()}


# --------------------------------------------------------------------------- many answers to one question


def _first_label(labels: list[int]) -> int:
    """Index of the first counted label, at least 1 (label 0 has no position to predict it)."""
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX:
            return max(i, 1)
    return len(labels)


@torch.no_grad()
def prompt_shared_nll(model, samples: list[dict[str, list[int]]], pad_id: int, batch_size: int,
                      shard: Shard = SINGLE) -> list[tuple[float, int]]:
    """Summed NLL and count of each sample's counted labels (``{"input_ids", "labels"}``, labels aligned with
    the inputs), the same values as one forward per sample; identical samples are computed once.

    Samples whose tokens before their first counted label agree (one question's answers) share one forward
    of that prompt: its KV cache, repeated for each answer, serves a second forward over the answers alone,
    and the prompt's last state predicts every answer's first token. TOFU scores 7 answers per question, so
    each question's tokens are run once instead of 7 times. Batches hold up to ``batch_size`` answers of
    whole questions (a question with more is split); each process of ``shard`` runs its batches and every
    process gets all values.
    """
    from evals.decoding import grouped_kv_attention

    distinct: dict[tuple, int] = {}
    of_sample = [distinct.setdefault((tuple(s["input_ids"]), tuple(s["labels"])), len(distinct)) for s in samples]
    rows = list(distinct)  # (input_ids, labels) of each distinct sample
    by_prompt: dict[tuple, list[int]] = {}
    for r, (ids, labels) in enumerate(rows):
        by_prompt.setdefault(ids[: _first_label(list(labels))], []).append(r)
    groups = [members[i : i + batch_size] for members in by_prompt.values()
              for i in range(0, len(members), batch_size)]
    groups.sort(key=lambda g: -max(len(rows[r][0]) for r in g))  # similar lengths share a batch
    batches: list[list[list[int]]] = []
    for group in groups:
        if batches and sum(map(len, batches[-1])) + len(group) <= batch_size:
            batches[-1].append(group)
        else:
            batches.append([group])

    from evals.decoding import decoder_unsupported

    head = fusable_head(model, inference=True)
    # the shared prompt's cache is our decoder's (rows selected in place): other architectures run every sample
    run_batch = _plain_batch if decoder_unsupported(model) else _shared_batch
    local: dict[int, tuple[float, int]] = {}
    with grouped_kv_attention(model):
        for number, batch in enumerate(batches):
            if shard.owns(number):
                local.update(run_batch(model, head, rows, batch, pad_id))
    values = shard.gather(local, len(rows))
    return [values[r] for r in of_sample]


def _sums_and_counts(states: torch.Tensor, target: torch.Tensor, head, members: list[int]
                     ) -> dict[int, tuple[float, int]]:
    """Summed NLL and count of each row's counted targets, from logits or (fused) the head's input."""
    counted = target != IGNORE_INDEX
    picked = states[counted]
    if head is not None:
        with gathered(head.weight) as weight:
            nll = _HeadTokenValues.apply(picked, weight, target[counted], "nll")
    else:
        nll = F.cross_entropy(picked, target[counted], reduction="none")
    sums = torch.zeros(len(members), dtype=nll.dtype, device=states.device).index_put_(
        (counted.nonzero()[:, 0],), nll, accumulate=True)
    counts = counted.sum(dim=1)
    return {r: (float(s), int(n)) for r, s, n in zip(members, sums.tolist(), counts.tolist(), strict=True)}


def _plain_batch(model, head, rows: list[tuple], groups: list[list[int]], pad_id: int) -> dict[int, tuple[float, int]]:
    """One batch of :func:`prompt_shared_nll` without the shared prompt: every sample in one right-padded forward
    (for architectures our decoding cache is not tested on)."""
    device = model.device
    members = [r for group in groups for r in group]
    width = max(len(rows[r][0]) for r in members)
    ids = torch.full((len(members), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(members), width), dtype=torch.long)
    labels = torch.full((len(members), width), IGNORE_INDEX, dtype=torch.long)
    for row, r in enumerate(members):
        tokens, targets = rows[r]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
        labels[row, : len(targets)] = torch.tensor(targets, dtype=torch.long)
    with head_input_taken(head) if head is not None else contextlib.nullcontext() as taken:
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    states = taken[0] if head is not None else upcast(logits)
    return _sums_and_counts(states, shift_labels(labels.to(device)), head, members)


def _shared_batch(model, head, rows: list[tuple], groups: list[list[int]], pad_id: int) -> dict[int, tuple[float, int]]:
    """One batch of :func:`prompt_shared_nll`: a forward of the groups' prompts, then of their answers."""
    from evals.decoding import decoding_cache, left_padded

    device = model.device
    prompts = [rows[g[0]][0][: _first_label(list(rows[g[0]][1]))] for g in groups]
    prompt_ids, prompt_mask, prompt_position = left_padded(prompts, pad_id, device)  # prompts end in the last column
    members = [r for group in groups for r in group]
    group_of = torch.tensor([g for g, group in enumerate(groups) for _ in group], device=device)
    # answer inputs: the tokens after the prompt but the last (whose prediction nobody reads)
    answers = [rows[r][0][len(prompts[g]) : -1] for g, group in enumerate(groups) for r in group]
    targets = [rows[r][1][len(prompts[g]) :] for g, group in enumerate(groups) for r in group]

    def run(**inputs) -> torch.Tensor:
        """The head's input (fused) or the logits at every position of the forward."""
        with head_input_taken(head) if head is not None else contextlib.nullcontext() as taken:
            logits = model(**inputs, use_cache=True).logits
        return taken[0] if head is not None else upcast(logits)

    cache = decoding_cache(model)
    states = run(input_ids=prompt_ids, attention_mask=prompt_mask, past_key_values=cache, position_ids=prompt_position,
                 logits_to_keep=1)
    first = states[:, -1][group_of]  # predicts each answer's first target
    answer_width = max(map(len, answers))
    if answer_width:
        cache.batch_select_indices(group_of)
        answer_ids = torch.full((len(members), answer_width), pad_id, dtype=torch.long)
        answer_mask = torch.zeros((len(members), answer_width), dtype=torch.long)
        for row, tokens in enumerate(answers):  # right padding: nothing real attends to it
            answer_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            answer_mask[row, : len(tokens)] = 1
        answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
        lengths = torch.tensor([len(p) for p in prompts], device=device)[group_of]
        rest = run(input_ids=answer_ids, attention_mask=torch.cat([prompt_mask[group_of], answer_mask], dim=1),
                   position_ids=lengths[:, None] + torch.arange(answer_width, device=device), past_key_values=cache)
        by_position = torch.cat([first[:, None], rest], dim=1)  # (rows, 1 + answer width, H or V)
    else:
        by_position = first[:, None]
    target = torch.full(by_position.shape[:2], IGNORE_INDEX, dtype=torch.long)
    for row, labels in enumerate(targets):
        target[row, : len(labels)] = torch.tensor(labels, dtype=torch.long)
    return _sums_and_counts(by_position, target.to(device), head, members)
