"""Choose forget and retain items from a model's own answers on a training set.

    python extract_data.py --test_data data/demo/train.jsonl --user_out_path results/train_pred.jsonl \
        --forget_out_path runs/forget.jsonl --retain_out_path runs/retain.jsonl --keep_prefixes choice

ROUGE-L (as evaluate.py computes it) between each gold answer and the model's answer: items at or
above `--forget_threshold` are memorised (forget), below `--retain_threshold` go to retain, those in
between are dropped. Private items (`name_key` starting with the competition's `privacy` or one of
`--private_prefixes`) never go to retain, whatever their score: retain is what training teaches the model, and
a private fact the model does not reproduce is not unlearnable either; such items (below `--forget_threshold`)
are reported and written to `--private_unknown_out_path` instead. An answer that ROUGE cannot score (empty, or
no word `rouge` can read, such as '.') is skipped, as the competition's script skipped it: counted and reported,
in neither file. Items whose `name_key` starts with one of `--keep_prefixes` are never forgotten: they go to
retain while their score is at most `--keep_threshold` (up to `--max_keep` of them).
Lines are copied verbatim. `--predict --model_path M` first writes the answers with predict_demo.py's
code path. An empty forget or retain set is an error (nothing is written), and existing output files are
kept unless `--overwrite` (the defaults are the repository's own data/ files). `--private_prefixes` with no
value restores the competition's rule (every item by its score alone).
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

from dataset.reading import load_predictions, load_qa_jsonl
from evals.atec import atec_rouge_l_or_none
from evals.predict import add_generation_args, predict_answers
from utils.cli import ScriptParser, bool_arg, run_cli, setup_logging
from utils.errors import UserError
from utils.files import atomic_path, check_model_folder, check_output_free, write_jsonl

logger = logging.getLogger("extract_data")
PRIVATE_PREFIXES = ("privacy",)  # the competition's private category


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ScriptParser(__doc__)
    parser.add_argument("--test_data", required=True, help="training set (conversation format, with name_key)")
    parser.add_argument("--user_out_path", required=True, help="the model's answers ({'text'} JSONL, line-aligned)")
    parser.add_argument("--forget_out_path", default="data/forget/forget.jsonl", help="where forget items go")
    parser.add_argument("--retain_out_path", default="data/retain/retain.jsonl", help="where retain items go")
    parser.add_argument("--forget_threshold", type=float, default=0.5, help="ROUGE-L at or above: forget")
    parser.add_argument("--retain_threshold", type=float, default=0.25, help="ROUGE-L below: retain")
    parser.add_argument("--private_prefixes", nargs="*", default=None,
                        help="more name_key prefixes of private items, beside the competition's privacy: forget when "
                             "the model reproduces them, else left out (never retain); with no value, none is "
                             "private (the competition's rule)")
    parser.add_argument("--private_unknown_out_path", default=None,
                        help="where private items the model does not reproduce go (default: beside "
                             "--forget_out_path, <name>.private_unknown.jsonl)")
    parser.add_argument("--keep_prefixes", nargs="*", default=[], help="name_key prefixes that are never forgotten")
    parser.add_argument("--keep_threshold", type=float, default=0.8, help="keep-prefix items at most this: retain")
    parser.add_argument("--max_keep", type=int, default=None, help="at most this many keep-prefix items in retain")
    bool_arg(parser, "--overwrite", False, "replace existing --forget_out_path / --retain_out_path files")
    bool_arg(parser, "--predict", False, "generate --user_out_path first with --model_path")
    parser.add_argument("--model_path", default=None, help="model folder for --predict")
    add_generation_args(parser)  # 2,048 new tokens, as predict_demo.py and the competition
    return parser.parse_args(argv)


def split_items(keys: list[str], golds: list[str], answers: list[str], args: argparse.Namespace) -> list[str]:
    """A decision per item: ``forget``, ``retain``, ``dropped``, ``unscorable`` or ``private_unknown`` (a private
    item below ``--forget_threshold``: never retain)."""
    decisions, kept = [], 0
    for key, gold, answer in zip(keys, golds, answers, strict=True):
        score = atec_rouge_l_or_none(gold, answer)
        if score is None:
            decisions.append("unscorable")
        elif any(key.startswith(p) for p in args.private_prefixes):
            decisions.append("forget" if score >= args.forget_threshold else "private_unknown")
        elif any(key.startswith(p) for p in args.keep_prefixes):
            if score <= args.keep_threshold and (args.max_keep is None or kept < args.max_keep):
                decisions.append("retain")
                kept += 1
            else:
                decisions.append("dropped")
        elif score >= args.forget_threshold:
            decisions.append("forget")
        elif score < args.retain_threshold:
            decisions.append("retain")
        else:
            decisions.append("dropped")
    return decisions


def private_unknown_path(args: argparse.Namespace) -> Path:
    """``--private_unknown_out_path``, by default ``<forget file stem>.private_unknown.jsonl`` beside it."""
    if args.private_unknown_out_path:
        return Path(args.private_unknown_out_path)
    forget = Path(args.forget_out_path)
    return forget.with_name(f"{forget.stem}.private_unknown.jsonl")


def main(argv: list[str] | None = None) -> dict[str, int]:
    args = parse_args(argv)
    setup_logging()
    args.competition_rule = args.private_prefixes == []
    args.private_prefixes = [] if args.competition_rule else \
        list(dict.fromkeys([*PRIVATE_PREFIXES, *(args.private_prefixes or [])]))
    clash = sorted(p for p in args.keep_prefixes if any(p.startswith(q) or q.startswith(p)
                                                          for q in args.private_prefixes))
    if clash:
        raise UserError(f"--keep_prefixes {' '.join(clash)} overlaps --private_prefixes "
                        f"{' '.join(args.private_prefixes)}: a private item is never kept (retain is trained on)")
    side = private_unknown_path(args)
    for flag in ("forget_out_path", "retain_out_path"):
        check_output_free(getattr(args, flag), args.overwrite, f"--{flag}")
    check_output_free(side, args.overwrite, "--private_unknown_out_path")
    items = load_qa_jsonl(args.test_data)
    if args.predict:
        if not args.model_path:
            raise UserError("--predict needs --model_path")
        check_model_folder(args.model_path)
        write_jsonl(args.user_out_path, [{"text": a} for a in predict_answers(args, items)])
    answers = load_predictions(args.user_out_path, args.test_data, len(items))
    raw = [line for line in Path(args.test_data).read_text(encoding="utf-8").splitlines() if line.strip()]
    decisions = split_items([it.name_key for it in items], [it.answer for it in items], answers, args)
    forget = [line for line, d in zip(raw, decisions, strict=True) if d == "forget"]
    retain = [line for line, d in zip(raw, decisions, strict=True) if d == "retain"]
    if not forget:
        raise UserError("no item reached --forget_threshold: nothing to forget; nothing was written")
    if not retain:
        kept = decisions.count("dropped")
        raise UserError(f"no item went to retain (below --retain_threshold, or a --keep_prefixes item at most "
                        f"--keep_threshold); {kept} were dropped between the thresholds; nothing was written")
    unknown = [line for line, d in zip(raw, decisions, strict=True) if d == "private_unknown"]
    outputs = [(args.forget_out_path, forget), (args.retain_out_path, retain)] + ([(side, unknown)] if unknown else [])
    for path, lines in outputs:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if not unknown:
        Path(side).unlink(missing_ok=True)  # an earlier run's list (--overwrite) would describe other data
    counts = Counter((it.name_key.rsplit("_", 1)[0] if "_" in it.name_key else it.name_key, d)
                     for it, d in zip(items, decisions, strict=True))
    print(f"{'category':<20}{'forget':>8}{'retain':>8}{'dropped':>9}{'unscorable':>12}{'unknown':>9}")
    for cat in sorted({c for c, _ in counts}):
        print(f"{cat:<20}{counts[cat, 'forget']:>8}{counts[cat, 'retain']:>8}{counts[cat, 'dropped']:>9}"
              f"{counts[cat, 'unscorable']:>12}{counts[cat, 'private_unknown']:>9}")
    print(f"{len(forget)} forget -> {args.forget_out_path}; {len(retain)} retain -> {args.retain_out_path}")
    if unknown:
        print(f"{len(unknown)} private items the model does not know (ROUGE-L below --forget_threshold): not "
              f"unlearnable, left out -> {side}")
    unscorable = decisions.count("unscorable")
    if unscorable:
        print(f"{unscorable} items skipped: ROUGE-L cannot score their answer (empty, or no word, such as '.')")
    report_unprotected(items, decisions, args)
    return {"forget": len(forget), "retain": len(retain), "dropped": decisions.count("dropped"),
            "unscorable": unscorable, "private_unknown": len(unknown)}


def report_unprotected(items: list, decisions: list[str], args: argparse.Namespace) -> None:
    """Warn where the ROUGE rule may not be what the user meant: no item is private (so nothing is kept out of
    retain), or items outside the private categories go to forget only because the model reproduces them."""
    if args.competition_rule:
        return  # asked for: every item by its score alone
    private = [any(it.name_key.startswith(p) for p in args.private_prefixes) for it in items]
    if not any(private):
        logger.warning(f"no item's name_key starts with {' or '.join(args.private_prefixes) or '(no prefix)'}: none "
              "is treated as private, so a private fact the model does not reproduce goes to retain (and is trained "
              "on); name private items privacy_<n> or pass --private_prefixes")
        return
    public = [it for it, p, d in zip(items, private, decisions, strict=True) if not p and d == "forget"]
    if public:
        cats = sorted({it.name_key.rsplit("_", 1)[0] if "_" in it.name_key else it.name_key or "(no name_key)"
                       for it in public})
        logger.warning(f"{len(public)} items outside --private_prefixes go to forget because the model reproduces "
              f"them (categories: {', '.join(cats)}; e.g. {public[0].answer[:60]!r}); --keep_prefixes "
              f"{cats[0]} keeps a category out of forget")


if __name__ == "__main__":
    run_cli(main)
