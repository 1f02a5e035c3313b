"""TOFU evaluation: per-item logs in TOFU's layout, and TOFU's model utility / forget quality aggregation.

Definitions follow locuslab/tofu (``evaluate_util.py``, ``aggregate_eval_stat.py``,
``config/eval_everything.yaml``) exactly:

Per item of each set (texts formatted with the model family's tags, tokenised to at most 200 tokens,
labels = answer tokens + EOS, question masked):

- ``avg_gt_loss``: mean NLL per answer token of ``answer`` (``gt_loss`` the sum, ``num_token_gt`` the count);
- ``avg_paraphrased_loss``: the same for the *base* answer: ``paraphrased_answer`` on retain and forget,
  ``answer`` on real authors and world facts (``paraphrased_loss``, ``num_token_paraphrased``);
- ``average_perturb_loss``: that mean for each ``perturbed_answer`` (a list; ``perturb_loss``, ``num_token_perturb``);
- ``truth_ratio`` = exp(avg_paraphrased_loss - mean(average_perturb_loss));
- ``generated_text``: [prompt, greedy answer (prompt + answer <= 200 tokens), gold answer];
  ``rouge1_recall`` / ``rougeL_recall``: ``rouge_score`` with the Porter stemmer, gold as reference;
- real authors and world facts also get ``normalized_gt_loss`` = -log(p / (p + sum p_perturbed)), p = exp(-loss).

Aggregation, per set (retain, forget, real authors, world facts):

- Prob.: retain/forget: mean exp(-avg_gt_loss); real authors/world facts: mean p / (p + sum p_perturbed);
- ROUGE: mean rougeL_recall;
- Truth Ratio: with R = exp(mean(average_perturb_loss) - avg_paraphrased_loss): forget: mean min(R, 1/R);
  others: mean max(0, 1 - 1/R);
- Model Utility: harmonic mean of the nine non-forget values;
- Forget Quality: p-value of the two-sample KS test between R on the forget set of the model and of a
  retain-only model.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dataset.data_module import iter_jsonl
from evals.shard import SINGLE, Shard
from utils.utils import ChatTemplate, UserError

logger = logging.getLogger(__name__)

# log key -> (display name, base answer key); order as TOFU's eval_everything.yaml
EVAL_TASKS: dict[str, tuple[str, str]] = {
    "eval_log.json": ("Retain", "paraphrased_answer"),
    "eval_real_author_wo_options.json": ("Real Authors", "answer"),
    "eval_real_world_wo_options.json": ("Real World", "answer"),
    "eval_log_forget.json": ("Forget", "paraphrased_answer"),
}
MAX_LENGTH = 200  # TOFU's generation.max_length: tokenisation limit and prompt + answer limit


# --------------------------------------------------------------------------- reading


def load_tofu_set(path: str | Path, base_key: str, ds_size: int | None = None) -> list[dict]:
    """Items of a TOFU evaluation file (JSONL, or one JSON array), first ``ds_size`` of them, checked."""
    path = Path(path)
    rows = iter_jsonl(path)
    if len(rows) == 1 and isinstance(rows[0][1], list):  # a JSON array rather than JSON lines
        rows = [(rows[0][0], row) for row in rows[0][1]]
    items = []
    for number, obj in rows[:ds_size] if ds_size else rows:
        for key in ("question", "answer", base_key):
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                raise UserError(f"{path}, line {number}: missing string field '{key}'")
        perturbed = obj.get("perturbed_answer")
        if not isinstance(perturbed, list) or not perturbed or not all(isinstance(x, str) for x in perturbed):
            raise UserError(f"{path}, line {number}: field 'perturbed_answer' must be a non-empty list of strings")
        items.append(obj)
    if not items:
        raise UserError(f"{path}: no items")
    return items


# --------------------------------------------------------------------------- per-item metrics


def answer_losses(model, tokenizer, template: ChatTemplate, questions: Sequence[str], answers: Sequence[str],
                  batch_size: int = 16, max_length: int = MAX_LENGTH, shard: Shard = SINGLE
                  ) -> tuple[list[float], list[int]]:
    """Summed answer NLL and answer-token count of each (question, answer) pair (TOFU's get_batch_loss)."""
    import torch

    from evals.logprobs import HeadInput, fusable_head, head_input_taken, qa_batches, token_nll

    pairs = list(zip(questions, answers, strict=True))
    head = fusable_head(model)  # then the head runs on answer positions only, in chunks (no B x T x V logits)
    local: dict[int, tuple[float, int]] = {}
    for indices, batch in qa_batches(model, tokenizer, template, pairs, batch_size, max_length, shard):
        with torch.no_grad(), head_input_taken(head) if head is not None else contextlib.nullcontext() as taken:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = HeadInput(taken[0], head.weight) if head is not None else logits.float()
        nll, counted = token_nll(logits, batch["labels"])
        local.update(zip(indices, zip(nll.sum(-1).tolist(), counted.sum(-1).tolist(), strict=True), strict=True))
    results = shard.gather(local, len(pairs))
    return [s for s, _ in results], [n for _, n in results]


def rouge_recalls(golds: Sequence[str], generations: Sequence[str]) -> tuple[list[float], list[float]]:
    """ROUGE-1 and ROUGE-L recall of each generation against its gold answer (Porter stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(gold, gen) for gold, gen in zip(golds, generations, strict=True)]
    return [s["rouge1"].recall for s in scores], [s["rougeL"].recall for s in scores]


def evaluate_set(model, tokenizer, template: ChatTemplate, items: list[dict], base_key: str, normalise: bool,
                 batch_size: int = 16, generate: bool = True, shard: Shard = SINGLE) -> dict[str, dict]:
    """One set's per-item log, in TOFU's layout (``{metric: {index: value}}``); each process of ``shard``
    computes its batches and every process gets the whole log."""
    from evals.generation import GenerationConfig, generate_with_model

    questions = [it["question"] for it in items]
    keys = [str(i) for i in range(len(items))]
    gt_sum, gt_n = answer_losses(model, tokenizer, template, questions, [it["answer"] for it in items], batch_size,
                                 shard=shard)
    base_sum, base_n = answer_losses(model, tokenizer, template, questions, [it[base_key] for it in items],
                                     batch_size, shard=shard)
    flat_q = [it["question"] for it in items for _ in it["perturbed_answer"]]
    flat_a = [p for it in items for p in it["perturbed_answer"]]
    pert_sum_flat, pert_n_flat = answer_losses(model, tokenizer, template, flat_q, flat_a, batch_size, shard=shard)
    pert_sum, pert_n, at = [], [], 0
    for it in items:
        k = len(it["perturbed_answer"])
        pert_sum.append(pert_sum_flat[at : at + k])
        pert_n.append(pert_n_flat[at : at + k])
        at += k

    def by_item(values: Sequence) -> dict:
        return dict(zip(keys, values, strict=True))

    def mean(sums: Sequence[float], counts: Sequence[int]) -> list[float]:
        return [total / n for total, n in zip(sums, counts, strict=True)]

    avg_gt, avg_base = mean(gt_sum, gt_n), mean(base_sum, base_n)
    avg_pert = [mean(sums, counts) for sums, counts in zip(pert_sum, pert_n, strict=True)]
    log: dict[str, dict] = {"avg_gt_loss": by_item(avg_gt), "gt_loss": by_item(gt_sum), "num_token_gt": by_item(gt_n)}
    if generate:
        prompts = [template.prompt(q) for q in questions]
        config = GenerationConfig(batch_size=batch_size)
        generations = generate_with_model(model, tokenizer, prompts, config, max_length=MAX_LENGTH, shard=shard)
        golds = [it["answer"] for it in items]
        rouge1, rouge_l = rouge_recalls(golds, generations)
        log["generated_text"] = by_item([list(row) for row in zip(prompts, generations, golds, strict=True)])
        log["rouge1_recall"] = by_item(rouge1)
        log["rougeL_recall"] = by_item(rouge_l)
    log.update({
        "average_perturb_loss": by_item(avg_pert),
        "avg_paraphrased_loss": by_item(avg_base),
        "truth_ratio": by_item([math.exp(b - float(np.mean(p))) for b, p in zip(avg_base, avg_pert, strict=True)]),
        "paraphrased_loss": by_item(base_sum),
        "perturb_loss": by_item(pert_sum),
        "num_token_paraphrased": by_item(base_n),
        "num_token_perturb": by_item(pert_n),
    })
    if normalise:
        log["normalized_gt_loss"] = by_item([
            -math.log(math.exp(-g) / (math.exp(-g) + sum(math.exp(-x) for x in p)))
            for g, p in zip(avg_gt, avg_pert, strict=True)
        ])
    return log


def evaluate_all(model, tokenizer, template: ChatTemplate, paths: dict[str, str | Path], ds_size: int | None = 300,
                 batch_size: int = 16, shard: Shard = SINGLE) -> dict[str, dict]:
    """The aggregated log (``eval_log_aggregated.json`` layout) for the four sets ``paths`` names by log key
    (split across the processes of ``shard``; every process gets the whole log)."""
    from tqdm.auto import tqdm

    result = {}
    for key in tqdm(EVAL_TASKS, desc="TOFU sets", unit="set", disable=not shard.is_main):
        name, base_key = EVAL_TASKS[key]
        items = load_tofu_set(paths[key], base_key, ds_size)
        logger.info("TOFU %s: %d items from %s", name, len(items), paths[key])
        result[key] = evaluate_set(model, tokenizer, template, items, base_key, normalise="eval_log" not in key,
                                   batch_size=batch_size, shard=shard)
    return result


# --------------------------------------------------------------------------- aggregation


def _values(log: dict, metric: str) -> np.ndarray:
    return np.array(list(log[metric].values()), dtype=np.float64)


def _perturbed_ratio(log: dict) -> np.ndarray:
    """R = exp(mean perturbed loss - paraphrased loss) per item."""
    perturbed = np.array([np.mean(v) for v in log["average_perturb_loss"].values()], dtype=np.float64)
    return np.exp(perturbed - _values(log, "avg_paraphrased_loss"))


def model_utility(ckpt: dict[str, dict]) -> dict[str, float]:
    """TOFU's twelve per-set values and the Model Utility (harmonic mean of the nine non-forget ones)."""
    from scipy.stats import hmean

    out: dict[str, float] = {}
    for key, (name, _) in EVAL_TASKS.items():
        if key not in ckpt:
            raise UserError(f"the log has no {key!r} section")
        log = ckpt[key]
        if "eval_log" in key:
            prob = float(np.mean(np.exp(-_values(log, "avg_gt_loss"))))
        else:
            true = np.exp(-_values(log, "avg_gt_loss"))
            false = np.exp(-np.array(list(log["average_perturb_loss"].values()), dtype=np.float64))
            prob = float(np.mean(true / (true + false.sum(-1))))
        ratio = _perturbed_ratio(log)
        truth = np.minimum(ratio, 1 / ratio) if "forget" in key else np.maximum(0, 1 - 1 / ratio)
        out[f"ROUGE {name}"] = float(np.mean(_values(log, "rougeL_recall")))
        out[f"Prob. {name}"] = prob
        out[f"Truth Ratio {name}"] = float(np.mean(truth))
    out["Model Utility"] = float(hmean([v for k, v in out.items() if "Forget" not in k]))
    return out


def forget_quality(ckpt: dict[str, dict], retain: dict[str, dict]) -> dict[str, float]:
    """KS test between the forget-set truth ratios of the model and of a retain-only model."""
    from scipy.stats import ks_2samp

    test = ks_2samp(_perturbed_ratio(ckpt["eval_log_forget.json"]), _perturbed_ratio(retain["eval_log_forget.json"]))
    return {"Forget Quality": float(test.pvalue), "KS Test PVal Forget": float(test.pvalue),
            "KS Test Forget": float(test.statistic)}


def aggregate(ckpt: dict[str, dict], retain: dict[str, dict] | None = None) -> dict[str, float | None]:
    """Model Utility, the sub-metrics and (given a retain-only model's log) Forget Quality, by TOFU's names."""
    result: dict[str, float | None] = dict(model_utility(ckpt))
    if retain is None:
        result.update({"Forget Quality": None, "KS Test PVal Forget": None, "KS Test Forget": None})
    else:
        result.update(forget_quality(ckpt, retain))
    return result
