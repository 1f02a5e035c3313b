"""TOFU evaluation's command-line plumbing, shared by evaluate_tofu.py and the training scripts' --eval_tofu:
the four set-path options, reading a saved log, running and saving an evaluation, the summary table.
The metrics themselves are in `evals.tofu`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evals.shard import SINGLE, Shard
from evals.tofu import EVAL_TASKS, GENERATION_BATCH_SIZE, aggregate, evaluate_all
from utils.errors import UserError
from utils.files import write_json

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
    group.add_argument("--tofu_batch_size", type=int, default=16, help="evaluation batch size (answer losses)")
    group.add_argument("--tofu_generation_batch_size", type=int, default=None,
                       help="questions answered together (finished answers leave the batch, the next join); "
                            f"default {GENERATION_BATCH_SIZE['cpu']} on CPU, {GENERATION_BATCH_SIZE['gpu']} on a GPU "
                            "(the KV cache grows with it)")


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
                   ds_size: int | None, batch_size: int, shard: Shard = SINGLE,
                   generation_batch_size: int | None = None) -> dict:
    """Evaluate a loaded model (split across the processes of ``shard``), write both files into ``save_dir``
    (the main process alone), return the aggregate (on every process)."""
    retain = load_log(retain_result, "--retain_result") if retain_result else None
    log = evaluate_all(model, tokenizer, template, paths, ds_size=ds_size, batch_size=batch_size, shard=shard,
                       generation_batch_size=generation_batch_size)
    stats = aggregate(log, retain)
    if shard.is_main:
        write_json(save_dir / "eval_log_aggregated.json", log, indent=None)
        write_json(save_dir / "aggregate_stat.json", stats)
    shard.barrier()  # the files exist for every process once it returns
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
