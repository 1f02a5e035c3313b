"""Log-likelihood of answers to questions: (question, answer) pairs in training's format, batched for the
evaluation metrics, and many answers to one question scored in one pass of the question (TOFU's scorer)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from dataset.encoding import IGNORE_INDEX
from evals.shard import SINGLE, Shard
from ops.head import fusable_head, gathered, head_input_taken
from ops.token_values import head_row_values, shift_labels, upcast

__all__ = ["prompt_shared_nll", "qa_batches"]


def qa_batches(model, tokenizer, template, pairs, batch_size: int, max_length: int, shard: Shard = SINGLE):
    """(question, answer) pairs as training formats them (question masked), collated in batches on the
    model's device; yields ``(item indices, batch)``, only the batches this process of ``shard`` owns. A
    question that leaves no room for its answer is a :class:`~utils.errors.UserError`."""
    from dataset.data_module import ForgetRetainCollator
    from dataset.encoding import encode_qa
    from utils.errors import UserError
    from utils.loading import pad_id_of

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
            nll = head_row_values(picked, weight, target[counted], "nll")
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
