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

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dataset.reading import iter_jsonl
from evals.shard import SINGLE, Shard
from utils.chat_template import ChatTemplate
from utils.errors import UserError

logger = logging.getLogger(__name__)

# log key -> (display name, base answer key); order as TOFU's eval_everything.yaml
EVAL_TASKS: dict[str, tuple[str, str]] = {
    "eval_log.json": ("Retain", "paraphrased_answer"),
    "eval_real_author_wo_options.json": ("Real Authors", "answer"),
    "eval_real_world_wo_options.json": ("Real World", "answer"),
    "eval_log_forget.json": ("Forget", "paraphrased_answer"),
}
MAX_LENGTH = 200  # TOFU's generation.max_length: tokenisation limit and prompt + answer limit
# TOFU's eval batch_size: generate(max_length=200) ran on batches of 30 items in file order, so an answer's budget
# is 200 minus the padded width of its batch of 30 (kept whatever our batch sizes, so answers match TOFU's)
TOFU_BATCH_SIZE = 30
# Questions answered together (finished answers leave, the next questions join): larger runs the matrix products
# faster on a CPU; on a GPU 64 bounds the KV cache (64 x 200 tokens of Llama-2-7B in bfloat16: 6.7 GB).
GENERATION_BATCH_SIZE = {"cpu": 128, "gpu": 64}


def generation_batch_size(model, requested: int | None = None) -> int:
    """``requested``, else ``GENERATION_BATCH_SIZE`` for the model's device."""
    if requested is not None:
        return requested
    return GENERATION_BATCH_SIZE["cpu" if model.device.type == "cpu" else "gpu"]


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
    """Summed answer NLL and answer-token count of each (question, answer) pair (TOFU's get_batch_loss); the
    answers to one question share one forward of it (:func:`evals.answer_nll.prompt_shared_nll`)."""
    from dataset.encoding import encode_qa
    from evals.answer_nll import prompt_shared_nll
    from utils.loading import pad_id_of

    samples = []
    for q, a in zip(questions, answers, strict=True):
        sample = encode_qa(tokenizer, template, q, a, max_length, mask=True)
        if sample is None:
            raise UserError(f"question longer than {max_length} tokens: {q[:80]!r}")
        samples.append(sample)
    results = prompt_shared_nll(model, samples, pad_id_of(tokenizer), batch_size, shard)
    return [s for s, _ in results], [n for _, n in results]


def rouge_recalls(golds: Sequence[str], generations: Sequence[str]) -> tuple[list[float], list[float]]:
    """ROUGE-1 and ROUGE-L recall of each generation against its gold answer (Porter stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(gold, gen) for gold, gen in zip(golds, generations, strict=True)]
    return [s["rouge1"].recall for s in scores], [s["rougeL"].recall for s in scores]


def generate_answers(model, tokenizer, template: ChatTemplate, sets: Sequence[list[dict]],
                     batch_size: int | None = None, shard: Shard = SINGLE) -> list[list[str]]:
    """Greedy answers to every question of ``sets``, all sets decoded together (fuller batches), each answer
    with TOFU's budget (see ``TOFU_BATCH_SIZE``)."""
    from evals.generation import budgets_by_batch_width, generate_with_model
    from evals.sampling import GenerationConfig

    prompts = [[template.prompt(it["question"]) for it in items] for items in sets]
    budgets = [b for p in prompts for b in budgets_by_batch_width(tokenizer, p, MAX_LENGTH, TOFU_BATCH_SIZE)]
    config = GenerationConfig(batch_size=generation_batch_size(model, batch_size))
    flat = generate_with_model(model, tokenizer, [q for p in prompts for q in p], config, max_new_tokens=budgets,
                               shard=shard)
    out, at = [], 0
    for p in prompts:
        out.append(flat[at : at + len(p)])
        at += len(p)
    return out


def evaluate_set(model, tokenizer, template: ChatTemplate, items: list[dict], base_key: str, normalise: bool,
                 batch_size: int = 16, generate: bool = True, shard: Shard = SINGLE,
                 generations: Sequence[str] | None = None) -> dict[str, dict]:
    """One set's per-item log, in TOFU's layout (``{metric: {index: value}}``); each process of ``shard``
    computes its batches and every process gets the whole log. ``generations``: the set's answers when
    already generated (:func:`generate_answers`), else they are generated here."""
    questions = [it["question"] for it in items]
    keys = [str(i) for i in range(len(items))]
    flat_q = [it["question"] for it in items for _ in it["perturbed_answer"]]
    flat_a = [p for it in items for p in it["perturbed_answer"]]
    # one call: an item's answers (ground truth, base, perturbed) share the forward of its question
    sums, counts = answer_losses(model, tokenizer, template, questions + questions + flat_q,
                                 [it["answer"] for it in items] + [it[base_key] for it in items] + flat_a,
                                 batch_size, shard=shard)
    n = len(items)
    gt_sum, gt_n, base_sum, base_n = sums[:n], counts[:n], sums[n : 2 * n], counts[n : 2 * n]
    pert_sum_flat, pert_n_flat = sums[2 * n :], counts[2 * n :]
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
        if generations is None:
            generations = generate_answers(model, tokenizer, template, [items], shard=shard)[0]
        prompts = [template.prompt(q) for q in questions]
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
                 batch_size: int = 16, shard: Shard = SINGLE,
                 generation_batch_size: int | None = None) -> dict[str, dict]:
    """The aggregated log (``eval_log_aggregated.json`` layout) for the four sets ``paths`` names by log key
    (split across the processes of ``shard``; every process gets the whole log)."""
    from tqdm.auto import tqdm

    sets = {}
    for key, (name, base_key) in EVAL_TASKS.items():
        sets[key] = load_tofu_set(paths[key], base_key, ds_size)
        logger.info("TOFU %s: %d items from %s", name, len(sets[key]), paths[key])
    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, template, list(sets.values()), generation_batch_size, shard)
    logger.info("TOFU: %d answers generated in %.1f s", sum(map(len, answers)), time.perf_counter() - start)
    result = {}
    start = time.perf_counter()
    for (key, items), generations in zip(tqdm(sets.items(), desc="TOFU sets", unit="set", disable=not shard.is_main),
                                         answers, strict=True):
        result[key] = evaluate_set(model, tokenizer, template, items, EVAL_TASKS[key][1],
                                   normalise="eval_log" not in key, batch_size=batch_size, shard=shard,
                                   generations=generations)
    logger.info("TOFU: answer losses and ROUGE of the four sets in %.1f s", time.perf_counter() - start)
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
