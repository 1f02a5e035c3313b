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

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dataset.data_module import iter_jsonl
from utils.utils import ChatTemplate, UserError, write_json

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
                  batch_size: int = 16, max_length: int = MAX_LENGTH) -> tuple[list[float], list[int]]:
    """Summed answer NLL and answer-token count of each (question, answer) pair (TOFU's get_batch_loss)."""
    import torch

    from dataset.data_module import ForgetRetainCollator, encode_qa
    from evals.logprobs import token_nll

    samples = []
    for q, a in zip(questions, answers, strict=True):
        sample = encode_qa(tokenizer, template, q, a, max_length, mask=True)
        if sample is None:
            raise UserError(f"question longer than {max_length} tokens: {q[:80]!r}")
        samples.append({"x": sample})
    collate = ForgetRetainCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                   else tokenizer.eos_token_id)
    sums: list[float] = []
    counts: list[int] = []
    for start in range(0, len(samples), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(samples[start : start + batch_size])["x"].items()}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, counted = token_nll(logits.float(), batch["labels"])
        sums += nll.sum(-1).tolist()
        counts += counted.sum(-1).tolist()
    return sums, counts


def rouge_recalls(golds: Sequence[str], generations: Sequence[str]) -> tuple[list[float], list[float]]:
    """ROUGE-1 and ROUGE-L recall of each generation against its gold answer (Porter stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(gold, gen) for gold, gen in zip(golds, generations, strict=True)]
    return [s["rouge1"].recall for s in scores], [s["rougeL"].recall for s in scores]


def evaluate_set(model, tokenizer, template: ChatTemplate, items: list[dict], base_key: str, normalise: bool,
                 batch_size: int = 16, generate: bool = True) -> dict[str, dict]:
    """One set's per-item log, in TOFU's layout (``{metric: {index: value}}``)."""
    from evals.generation import GenerationConfig, generate_with_model

    questions = [it["question"] for it in items]
    keys = [str(i) for i in range(len(items))]
    gt_sum, gt_n = answer_losses(model, tokenizer, template, questions, [it["answer"] for it in items], batch_size)
    base_sum, base_n = answer_losses(model, tokenizer, template, questions, [it[base_key] for it in items],
                                     batch_size)
    flat_q = [it["question"] for it in items for _ in it["perturbed_answer"]]
    flat_a = [p for it in items for p in it["perturbed_answer"]]
    pert_sum_flat, pert_n_flat = answer_losses(model, tokenizer, template, flat_q, flat_a, batch_size)
    pert_sum, pert_n, at = [], [], 0
    for it in items:
        k = len(it["perturbed_answer"])
        pert_sum.append(pert_sum_flat[at : at + k])
        pert_n.append(pert_n_flat[at : at + k])
        at += k

    avg_gt = [s / n for s, n in zip(gt_sum, gt_n, strict=True)]
    avg_base = [s / n for s, n in zip(base_sum, base_n, strict=True)]
    avg_pert = [[s / n for s, n in zip(ss, nn, strict=True)] for ss, nn in zip(pert_sum, pert_n, strict=True)]
    log: dict[str, dict] = {
        "avg_gt_loss": dict(zip(keys, avg_gt, strict=True)),
        "gt_loss": dict(zip(keys, gt_sum, strict=True)),
        "num_token_gt": dict(zip(keys, gt_n, strict=True)),
    }
    if generate:
        prompts = [template.prompt(q) for q in questions]
        config = GenerationConfig(batch_size=batch_size)
        generations = generate_with_model(model, tokenizer, prompts, config, max_length=MAX_LENGTH)
        golds = [it["answer"] for it in items]
        rouge1, rouge_l = rouge_recalls(golds, generations)
        log["generated_text"] = {k: [p, g, a] for k, p, g, a in zip(keys, prompts, generations, golds, strict=True)}
        log["rouge1_recall"] = dict(zip(keys, rouge1, strict=True))
        log["rougeL_recall"] = dict(zip(keys, rouge_l, strict=True))
    log.update({
        "average_perturb_loss": dict(zip(keys, avg_pert, strict=True)),
        "avg_paraphrased_loss": dict(zip(keys, avg_base, strict=True)),
        "truth_ratio": {k: math.exp(b - float(np.mean(p))) for k, b, p in zip(keys, avg_base, avg_pert, strict=True)},
        "paraphrased_loss": dict(zip(keys, base_sum, strict=True)),
        "perturb_loss": dict(zip(keys, pert_sum, strict=True)),
        "num_token_paraphrased": dict(zip(keys, base_n, strict=True)),
        "num_token_perturb": dict(zip(keys, pert_n, strict=True)),
    })
    if normalise:
        log["normalized_gt_loss"] = {
            k: -math.log(math.exp(-g) / (math.exp(-g) + sum(math.exp(-x) for x in p)))
            for k, g, p in zip(keys, avg_gt, avg_pert, strict=True)
        }
    return log


def evaluate_all(model, tokenizer, template: ChatTemplate, paths: dict[str, str | Path], ds_size: int | None = 300,
                 batch_size: int = 16) -> dict[str, dict]:
    """The aggregated log (``eval_log_aggregated.json`` layout) for the four sets ``paths`` names by log key."""
    from tqdm.auto import tqdm

    result = {}
    for key in tqdm(EVAL_TASKS, desc="TOFU sets", unit="set"):
        name, base_key = EVAL_TASKS[key]
        items = load_tofu_set(paths[key], base_key, ds_size)
        logger.info("TOFU %s: %d items from %s", name, len(items), paths[key])
        result[key] = evaluate_set(model, tokenizer, template, items, base_key, normalise="eval_log" not in key,
                                   batch_size=batch_size)
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


# --------------------------------------------------------------------------- command-line helpers (evaluate_tofu.py,
# and the training scripts' --eval_tofu)

SET_FLAGS = {  # log key -> command-line flag
    "eval_log.json": "retain_path",
    "eval_real_author_wo_options.json": "real_authors_path",
    "eval_real_world_wo_options.json": "world_facts_path",
    "eval_log_forget.json": "forget_path",
}
def add_tofu_set_args(parser: argparse.ArgumentParser) -> None:
    """The four TOFU evaluation files (shared with the training scripts' --eval_tofu)."""
    group = parser.add_argument_group("TOFU sets (TOFU's *_perturbed.json format)")
    group.add_argument("--forget_path", help="the forget split, e.g. forget10_perturbed.json")
    group.add_argument("--retain_path", help="retain_perturbed.json")
    group.add_argument("--real_authors_path", help="real_authors_perturbed.json")
    group.add_argument("--world_facts_path", help="world_facts_perturbed.json")
    group.add_argument("--ds_size", type=int, default=300, help="first N items of each set (TOFU uses 300)")
    group.add_argument("--tofu_batch_size", type=int, default=16, help="evaluation batch size")


def set_paths(args: argparse.Namespace) -> dict[str, str]:
    missing = [f"--{flag}" for flag in SET_FLAGS.values() if not getattr(args, flag)]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (the four TOFU evaluation files)")
    for flag in SET_FLAGS.values():
        if not Path(getattr(args, flag)).is_file():
            raise UserError(f"--{flag} {getattr(args, flag)}: file not found")
    return {key: getattr(args, flag) for key, flag in SET_FLAGS.items()}


def load_log(path: str | Path, flag: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found")
    try:
        log = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{flag} {path}: not JSON ({err.msg}, line {err.lineno})") from None
    missing = [k for k in EVAL_TASKS if k not in log]
    if missing:
        raise UserError(f"{flag} {path}: not an eval_log_aggregated.json (no {', '.join(missing)})")
    return log


def run_evaluation(model, tokenizer, template, paths: dict[str, str], save_dir: Path, retain_result: str | None,
                   ds_size: int | None, batch_size: int) -> dict:
    """Evaluate a loaded model, write both files into ``save_dir``, return the aggregate."""
    retain = load_log(retain_result, "--retain_result") if retain_result else None
    log = evaluate_all(model, tokenizer, template, paths, ds_size=ds_size, batch_size=batch_size)
    write_json(save_dir / "eval_log_aggregated.json", log, indent=None)
    stats = aggregate(log, retain)
    write_json(save_dir / "aggregate_stat.json", stats)
    return stats


ORDER = ["Model Utility", "Forget Quality"] + [f"{m} {n}" for n in ("Retain", "Real Authors", "Real World", "Forget")
                                               for m in ("ROUGE", "Prob.", "Truth Ratio")]


def format_table(stats: dict) -> str:
    lines = [f"{'metric':<26}{'value':>14}"]
    for name in ORDER:
        value = stats.get(name)
        lines.append(f"{name:<26}{'-' if value is None else format(value, '.6g'):>14}")
    if stats.get("Forget Quality") is None:
        lines.append("Forget Quality needs --retain_result: the log of a model trained on the retain split only")
    return "\n".join(lines)
