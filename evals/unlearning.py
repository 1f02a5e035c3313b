"""One evaluation of an unlearned model: forget / retain / holdout / general sets through generation, per-token
log-probabilities and gradients, into per-item logs and one summary (see :mod:`evals.mia` for the MIA
definitions and orientation).

Per item: the greedy answer, its ATEC ROUGE-L F against the gold answer and TOFU's ROUGE-L recall, whether
it is a refusal, and from one teacher-forced forward pass of (question, gold answer): the MIA scores,
exact memorisation (EM) and extraction strength (ES); GradNorm from one backward pass per item.

Summary: per set the means; for every MIA score the AUC of forget (members) against holdout items; with
a retain-only model's summary, PrivLeak of each.

Knowledge check (:func:`knowledge_check`): from the forget rows, does the model know the facts at all? A model that
never knew them has nothing to unlearn, and its "after" numbers equal its "before" ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from evals.mia import (
    MiaOptions,
    auc,
    exact_memorisation,
    extraction_strength,
    gradnorm_score,
    loss_score,
    mean,
    min_k_plus_plus_score,
    min_k_score,
    priv_leak,
    reference_score,
    tokenwise,
    zlib_score,
)
from evals.shard import SINGLE, Shard
from utils.chat_template import ChatTemplate
from utils.errors import UserError

logger = logging.getLogger(__name__)

SETS = ("forget", "retain", "holdout", "general")
DEFAULT_MIA = MiaOptions()
MIA_SCORES = ("loss", "zlib", "min_k", "min_k_pp", "reference", "gradnorm")


@dataclass
class TokenStats:
    """Teacher-forced statistics of one (question, answer) pair's answer tokens."""

    logprobs: list[float]
    mu: list[float]
    sigma: list[float]
    argmax: list[int]
    labels: list[int]


def token_stats(model, tokenizer, template: ChatTemplate, pairs: Sequence[tuple[str, str]], batch_size: int = 8,
                max_length: int = 512, shard: Shard = SINGLE) -> list[TokenStats]:
    """Per item: log p of each answer token, the moments of log p at its position, the argmax and labels.

    The output head runs at answer positions only (``logits_to_keep``), and for a fusable head
    (:func:`ops.head.fusable_head`) not at all in the forward: the statistics come from its input in
    chunks (:func:`ops.token_values.position_stats`), so no ``batch x length x vocabulary`` tensor is made (2.5 GB
    in float32 at batch 8, 512 tokens, a 152k vocabulary)."""
    import contextlib

    import torch

    from evals.answer_nll import qa_batches
    from ops.head import accepts_logits_to_keep, fusable_head, head_input_taken, kept_positions
    from ops.token_values import position_stats, shift_labels

    head = fusable_head(model, inference=True)
    keep_some = accepts_logits_to_keep(model)
    out: dict[int, TokenStats] = {}
    for indices, batch in qa_batches(model, tokenizer, template, pairs, batch_size, max_length, shard):
        keep, labels = kept_positions(batch["labels"]) if keep_some else (None, batch["labels"])
        kwargs = {} if keep is None else {"logits_to_keep": keep}
        with torch.no_grad(), head_input_taken(head) if head is not None else contextlib.nullcontext() as taken:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
        rows = taken[0] if head is not None else logits
        target = shift_labels(labels)
        counted = target != -100
        logp, mu, sigma, argmax = position_stats(rows[counted], target[counted],
                                                 head.weight if head is not None else None)
        per_row = counted.sum(dim=1).tolist()
        ends = [sum(per_row[: r + 1]) for r in range(len(per_row))]
        for row, item in enumerate(indices):
            span = slice(ends[row] - per_row[row], ends[row])
            out[item] = TokenStats(logprobs=logp[span].tolist(), mu=mu[span].tolist(), sigma=sigma[span].tolist(),
                                   argmax=argmax[span].tolist(), labels=target[counted][span].tolist())
    return shard.gather(out, len(pairs))


def reference_nlls(model, tokenizer, template: ChatTemplate, pairs: Sequence[tuple[str, str]], batch_size: int = 8,
                   max_length: int = 512, shard: Shard = SINGLE) -> list[float]:
    """Mean answer NLL of each pair under ``model`` (for the Reference score)."""
    return [loss_score(st.logprobs)
            for st in token_stats(model, tokenizer, template, pairs, batch_size, max_length, shard)]


def adapter_off_reference(model, tokenizer, template: ChatTemplate, batch_size: int = 8, shard: Shard = SINGLE
                          ) -> Callable[[Sequence[tuple[str, str]]], list[float]]:
    """The Reference score's reference for a ``PeftModel``: the same weights with the adapter switched off."""
    def reference(pairs: Sequence[tuple[str, str]]) -> list[float]:
        with model.disable_adapter():
            return reference_nlls(model, tokenizer, template, pairs, batch_size, shard=shard)

    return reference


def drop_last_labels(labels):
    """Labels with each row's last counted label set to ``IGNORE_INDEX`` (the token-wise scores' positions)."""
    import torch

    counted = labels != -100
    last = torch.where(counted.any(dim=1), counted.cumsum(dim=1).argmax(dim=1), -1)
    out = labels.clone()
    rows = (last >= 0).nonzero().squeeze(1)
    out[rows, last[rows]] = -100
    return out


def grad_norms(model, tokenizer, template: ChatTemplate, pairs: Sequence[tuple[str, str]],
               max_length: int = 512, shard: Shard = SINGLE, options: MiaOptions = DEFAULT_MIA) -> list[float]:
    """GradNorm: per item, the gradient of its mean answer NLL (the last label left out unless
    ``options.keep_last``) over the model's weights, reduced over weight tensors as ``options.gradnorm_reduction``
    (:func:`evals.mia.gradnorm_score`: open-unlearning's mean of per-tensor norms by default). The weights are the
    model's own (a LoRA adapter's tensors are not weights of the merged model; the base weights' gradients are
    those of the merged weights). Weights' ``requires_grad`` flags and the train/eval mode are restored.

    Each weight's gradient is reduced and dropped as soon as backward has made it (a post-accumulate hook), so the
    pass never holds a whole model's gradient (14 GB for a 7B model in bf16); logits are made at answer positions
    only."""
    import torch

    from evals.answer_nll import qa_batches
    from ops.head import accepts_logits_to_keep, kept_positions
    from ops.token_values import token_nll

    params = [p for n, p in model.named_parameters() if p.is_floating_point() and "lora_" not in n]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()  # no dropout: the score is a function of the item
    norms_of_tensors: list[torch.Tensor] = []

    def take_norm(param: torch.Tensor) -> None:
        norms_of_tensors.append(param.grad.detach().float().norm())
        param.grad = None

    keep_some = accepts_logits_to_keep(model)
    scores: dict[int, float] = {}
    hooks = []
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
            hooks.append(p.register_post_accumulate_grad_hook(take_norm))
        for (item,), batch in qa_batches(model, tokenizer, template, pairs, 1, max_length, shard):
            labels = batch["labels"] if options.keep_last else drop_last_labels(batch["labels"])
            keep, labels = kept_positions(labels) if keep_some else (None, labels)
            kwargs = {} if keep is None else {"logits_to_keep": keep}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
            nll, mask = token_nll(logits, labels)
            norms_of_tensors.clear()
            if mask.any():
                (nll.sum() / mask.sum()).backward()
            scores[item] = (gradnorm_score([float(x) for x in norms_of_tensors], options.gradnorm_reduction)
                            if norms_of_tensors else 0.0)
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return shard.gather(scores, len(pairs))


def item_scores(stats: TokenStats, text: str, reference_nll: float | None, gradnorm: float | None,
                options: MiaOptions = DEFAULT_MIA) -> dict[str, float | None]:
    """The MIA scores (loss-like: higher = less trained-on), EM and ES of one item, as open-unlearning defines
    them: LOSS, ZLib (``text``: the answer's tokens decoded without special tokens) and Reference over every answer
    label; Min-K%, Min-K%++, EM and ES without the last one (:func:`evals.mia.tokenwise`)."""
    nll = loss_score(stats.logprobs)
    logprobs, mu, sigma, argmax, labels = (tokenwise(v, options.keep_last) for v in
                                           (stats.logprobs, stats.mu, stats.sigma, stats.argmax, stats.labels))
    return {
        "loss": nll,
        "zlib": zlib_score(stats.logprobs, text),
        "min_k": min_k_score(logprobs, options.k),
        "min_k_pp": min_k_plus_plus_score(logprobs, mu, sigma, options.k),
        "reference": None if reference_nll is None else reference_score(nll, reference_nll),
        "gradnorm": gradnorm,
        "em": exact_memorisation(argmax, labels),
        "es": extraction_strength(argmax, labels),
    }


def evaluate_sets(model, tokenizer, template: ChatTemplate, sets: dict[str, Sequence[tuple[str, str]]],
                  refusals: Sequence[str], generate: Callable[[list[str]], list[str]],
                  reference: Callable[[Sequence[tuple[str, str]]], list[float]] | None = None,
                  gradnorm: bool = True, batch_size: int = 8, options: MiaOptions = DEFAULT_MIA,
                  shard: Shard = SINGLE) -> dict[str, list[dict]]:
    """Per-item logs of each named set (``forget``, ``retain``, ``holdout``, ``general``; any subset).

    ``generate`` maps prompts to greedy answers (the caller picks the backend, and its split across processes);
    it is called once, with every set's prompts (one stream for the engine). ``reference`` maps pairs to a
    reference model's mean answer NLLs (the Reference score; None leaves it out). The forward and backward
    passes are split across the processes of ``shard``.
    """
    from tqdm.auto import tqdm

    from evals.atec import atec_rouge_l, is_refusal
    from evals.tofu import rouge_recalls

    for name, pairs in sets.items():
        if not list(pairs):
            raise UserError(f"the {name} set is empty")
    answers_of = split_answers(sets, generate([template.prompt(q) for pairs in sets.values() for q, _ in pairs]))
    log: dict[str, list[dict]] = {}
    for name, pairs in tqdm(list(sets.items()), desc="evaluate sets", unit="set", disable=not shard.is_main):
        pairs = list(pairs)
        answers = answers_of[name]
        stats = token_stats(model, tokenizer, template, pairs, batch_size, shard=shard)
        refs = reference(pairs) if reference is not None else [None] * len(pairs)
        norms = (grad_norms(model, tokenizer, template, pairs, shard=shard, options=options) if gradnorm
                 else [None] * len(pairs))
        _, recall_l = rouge_recalls([a for _, a in pairs], answers)
        log[name] = [
            {"question": q, "answer": a, "generated": gen, "rougeL_f": atec_rouge_l(a, gen), "rougeL_recall": rec,
             "refusal": is_refusal(gen, refusals) if refusals else None,
             **item_scores(st, tokenizer.decode(st.labels, skip_special_tokens=True), ref, norm, options)}
            for (q, a), gen, st, ref, norm, rec in zip(pairs, answers, stats, refs, norms, recall_l, strict=True)
        ]
    return log


def split_answers(sets: dict[str, Sequence], answers: Sequence[str]) -> dict[str, list[str]]:
    """One answer list per set from the answers to all sets' prompts in order."""
    out, start = {}, 0
    for name, pairs in sets.items():
        out[name] = list(answers[start : start + len(pairs)])
        start += len(pairs)
    if start != len(answers):
        raise ValueError(f"{len(answers)} answers for {start} prompts")
    return out


def summarise(log: dict[str, list[dict]], retain_only: dict | None = None) -> dict:
    """Per-set means, the forget-vs-holdout AUC of every MIA score, and PrivLeak against ``retain_only``
    (the summary of a model never trained on the forget set) when given."""
    summary: dict = {"sets": {}}
    for name, rows in log.items():
        keys = ("rougeL_f", "rougeL_recall", "loss", "em", "es")
        summary["sets"][name] = {key: mean([r[key] for r in rows if r[key] is not None]) for key in keys}
        refusals = [r["refusal"] for r in rows if r["refusal"] is not None]
        summary["sets"][name]["refusal_rate"] = mean([float(x) for x in refusals]) if refusals else None
        summary["sets"][name]["items"] = len(rows)
    if "forget" in log and "holdout" in log:
        summary["auc"] = {}
        for score in MIA_SCORES:
            forget = [r[score] for r in log["forget"]]
            holdout = [r[score] for r in log["holdout"]]
            if None not in forget and None not in holdout:
                summary["auc"][score] = auc(forget, holdout)
        if retain_only is not None:
            base = retain_only.get("auc", {})
            summary["priv_leak"] = {s: priv_leak(a, base[s]) for s, a in summary["auc"].items() if s in base}
    return summary


def format_summary(summary: dict) -> str:
    """A plain-text table of a summary."""
    lines = ["| set | items | ROUGE-L F (ATEC) | ROUGE-L recall (TOFU) | answer NLL | EM | ES | refusals |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def f(x):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    for name, row in summary["sets"].items():
        lines.append(f"| {name} | {row['items']} | {f(row['rougeL_f'])} | {f(row['rougeL_recall'])} | "
                     f"{f(row['loss'])} | {f(row['em'])} | {f(row['es'])} | {f(row['refusal_rate'])} |")
    if "auc" in summary:
        lines += ["", "| MIA score (forget vs holdout) | AUC | PrivLeak % |", "| --- | --- | --- |"]
        for score, value in summary["auc"].items():
            lines.append(f"| {score} | {value:.3f} | {f(summary.get('priv_leak', {}).get(score))} |")
    return "\n".join(lines)


# The knowledge check's rules. An item is *known* when the model gives its gold answer a probability of at least
# KNOWN_PROBABILITY: per token, exp(-mean answer NLL) (TOFU's normalised probability, evals.robustness'
# forget_prob); 1/2 is a mean answer NLL of ln 2. Measured (runs/leaderboard, SmolLM2-135M, 12 forget + 12 holdout
# facts): the target that memorised the forget facts gives them 0.83 to 0.96; the retain-only model, which never saw
# them, 0.03 to 0.34 on them and at most 0.41 on the holdout; untouched SmolLM2 on the 96 of data/forget/forget.jsonl at
# most 0.38. The probability decides, not the greedy answer's ROUGE-L: the ROUGE rule of extract_data.py (reproduced =
# ROUGE-L F >= 0.5, the same ATEC ROUGE-L as rougeL_f here) also scores the answer's wording, and a model that knows
# how such answers read but not the facts passes it: the retain-only model "reproduces" 12 of 12 forget answers
# ("Ma Bo was diagnosed with anemia." for "... with arthritis.": 0.83). The reproduced count is reported beside.
KNOWN_PROBABILITY = 0.5
# extract_data.py's --forget_threshold: the model's greedy answer reproduces the gold one. rougeL_f is
# evals.atec.atec_rouge_l (extract_data.py's atec_rouge_l_or_none, with 0 for an unscorable pair such as an empty
# answer): an answer ROUGE cannot read reproduces nothing, where extract_data.py leaves such an item out.
REPRODUCED_ROUGE = 0.5
# "knows": at least 4 in 5 forget facts known (a few half-remembered ones do not make unlearning pointless);
# "does_not_know": fewer than 1 in 10 (a stray known item is an answer the model gives to every such question:
# the target above gives 0.84 to 1 of its 12 holdout facts, whose answer, "arthritis", is another person's);
# "partly" in between: the forget set mixes facts the model knows with facts there is nothing to remove from.
KNOWS_SHARE = 0.8
DOES_NOT_KNOW_SHARE = 0.1
OWN_DATA_DOCS = "README 'Your own data, start to finish'"


@dataclass
class KnowledgeVerdict:
    """What the model knows of the forget set (:func:`knowledge_check`); ``reproduced`` and ``mean_rouge`` are
    None without greedy answers."""

    items: int
    known: int
    reproduced: int | None
    mean_probability: float
    mean_rouge: float | None
    verdict: str  # "knows", "partly" or "does_not_know"
    basis: str
    message: str
    notes: list[str] = field(default_factory=list)


def knowledge_check(rows: Sequence[dict], greedy: bool = True, after_unlearning: bool = False) -> KnowledgeVerdict:
    """Does the model know the forget set's facts? From its :func:`evaluate_sets` forget rows: ``loss`` (mean
    answer NLL) and, with ``greedy``, ``rougeL_f`` of the greedy answers (rows whose ``rougeL_f`` is None count as
    without). ``after_unlearning``: the rows are of an unlearned model (the message says "still")."""
    rows = list(rows)
    if not rows:
        raise ValueError("the knowledge check needs at least one forget row")
    probabilities = [math.exp(-r["loss"]) for r in rows]
    rouges = [r.get("rougeL_f") for r in rows]
    greedy = greedy and None not in rouges
    n = len(rows)
    known = sum(p >= KNOWN_PROBABILITY for p in probabilities)
    mean_p = mean(probabilities)
    share = known / n
    verdict = "knows" if share >= KNOWS_SHARE else "does_not_know" if share < DOES_NOT_KNOW_SHARE else "partly"
    counts = f"the model knows {known} of {n} forget answers (gold-answer probability >= {KNOWN_PROBABILITY}; " \
             f"mean {mean_p:.2f})"
    reproduced = mean_rouge = None
    notes = []
    if greedy:
        reproduced = sum(x >= REPRODUCED_ROUGE for x in rouges)
        mean_rouge = mean(rouges)
        counts += f" and reproduces {reproduced} of {n} (greedy answer ROUGE-L >= {REPRODUCED_ROUGE}; " \
                  f"mean {mean_rouge:.2f})"
        said = [(x >= REPRODUCED_ROUGE, p >= KNOWN_PROBABILITY) for x, p in zip(rouges, probabilities, strict=True)]
        wording = sum(match and not probable for match, probable in said)
        unsaid = sum(probable and not match for match, probable in said)
        if wording:
            notes.append(f"{wording} greedy answers match the gold ones in wording with an improbable gold answer: "
                         "the answers' form (the question's words), not the facts (extract_data.py's ROUGE rule "
                         "would count them as forget)")
        if unsaid:
            notes.append(f"{unsaid} gold answers are probable but not in the greedy answers: the facts are in the "
                         "model's likelihoods, not in what it says")
    basis = "answer probabilities and greedy answers" if greedy else \
        "answer probabilities alone (no greedy answers)"
    prefix = "knowledge check" if greedy else "knowledge check (from answer probabilities alone: no greedy answers)"
    if after_unlearning:
        tail = {"knows": "it still knows these facts",
                "partly": f"it still knows {known} of these facts",
                "does_not_know": "it does not know these facts (whether it knew them before: run the check "
                                 "without --adapter)"}[verdict]
    else:
        tail = {"knows": "it knows these facts: there is something to unlearn",
                "partly": f"it knows only some of these facts: unlearning can remove only those {known}; the "
                          "others (rows with loss above ln 2 in eval_log.json) are not in the model, leave them "
                          "out of the forget set or check the data",
                "does_not_know": "it does not know these facts, so unlearning has nothing to remove; check the "
                                 f"model and the data first (docs: {OWN_DATA_DOCS})"}[verdict]
    message = f"{prefix}: {counts}: {tail}"
    return KnowledgeVerdict(items=n, known=known, reproduced=reproduced, mean_probability=mean_p,
                            mean_rouge=mean_rouge, verdict=verdict, basis=basis, message=message, notes=notes)


def format_knowledge_check(check: KnowledgeVerdict) -> str:
    """The check's message and its notes, one a line."""
    return "\n".join([check.message, *(f"  note: {note}" for note in check.notes)])
