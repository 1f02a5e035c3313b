"""The ATEC 2025 score of an unlearned model's answers against the original model's, on the validation set.

    python evaluate.py --model_name /models/judge --test_data data/demo/valid.jsonl \
        --user_out_path results/unlearned.jsonl --we_out_path results/original.jsonl \
        --out_path scores/unlearned.jsonl

    vllm serve /models/judge --port 8000 --seed 0          # the judge as a service, once, on its own machine
    python evaluate.py --judge_api_base http://judge-host:8000/v1 --model_name /models/judge \
        --test_data data/demo/valid.jsonl --user_out_path results/unlearned.jsonl \
        --we_out_path results/original.jsonl --out_path scores/unlearned.jsonl
    python evaluate.py ... --judge_replay scores/unlearned.jsonl.judge.jsonl   # again, no call

Categories by `name_key` prefix (as the competition read them, `name_key.startswith(prefix)`):
`privacy` (ROUGE-L, lower is better: forgotten), `noun_definition` (ROUGE-L, higher is better: kept),
`choice` (the text after 【答案】 must match), `qa` (an LLM judge compares the original model's answer
with the unlearned model's). Items with none of these prefixes are counted as "other" and not scored.
A category with no item is an error (`--allow_missing_categories` leaves it out of the score).
The judge is `--model_path` (the seed's `--model_name`), the scores go to `--out` (the seed's `--out_path`): the
option names of every evaluation command. `--model_path none` skips the judge (then `score` and
`participant_win` are null). The judge prompt is
the project's own unless `--judge_prompt FILE` (three `{}` slots: question, original answer, unlearned
answer); pass the competition's prompt file for the competition's number. Writes one JSON line, and every judge
call to `<out>.judge.jsonl` (`--judge_record`): request, raw reply, latency, verdict and why.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dataset.reading import load_predictions, load_qa_jsonl
from evals.atec import (
    ANSWER_MARKER,
    DEFAULT_JUDGE_PROMPT,
    MissingCategoryError,
    atec_score,
    category,
    check_judge_prompt,
    choice_answer,
    verdict_and_reason,
)
from evals.generation import BACKENDS, generate
from evals.prompts import build_prompts
from evals.sampling import GenerationConfig
from utils.cli import ScriptParser, bool_arg, run_cli, setup_logging
from utils.errors import UserError
from utils.files import check_model_folder, check_output_free, write_json, write_jsonl

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ScriptParser(__doc__)
    parser.add_argument("--model_path", "--model_name", dest="model_path", default="none",
                        help="the judge model's folder, or 'none' to skip the judge (the seed's --model_name)")
    parser.add_argument("--test_data", required=True, help="validation set (conversation format, with name_key)")
    parser.add_argument("--user_out_path", required=True, help="the unlearned model's answers ({'text'} JSONL)")
    parser.add_argument("--we_out_path", default=None, help="the original model's answers (needed by the judge)")
    parser.add_argument("--out", "--out_path", dest="out", required=True,
                        help="where to write the scores (one JSON line; the seed's --out_path)")
    parser.add_argument("--details_path", default=None, help="optional JSONL of per-item scores")
    bool_arg(parser, "--overwrite", False, "replace an existing --out / --details_path file")
    bool_arg(parser, "--allow_missing_categories", False,
             "score a test file that lacks a category by leaving that term out (default: an error)")
    judge = parser.add_argument_group("judge")
    judge.add_argument("--judge_prompt", default=None,
                       help="a UTF-8 file with the judge prompt: three {} slots filled with the question, the "
                            "original model's answer (回答1) and the unlearned model's (回答2); "
                            "default: the project's own prompt, which asks for the verdict alone")
    judge.add_argument("--judge_max_tokens", type=int, default=8192,
                       help="longest judge reply in tokens (the competition's 8192: a thinking judge cut off "
                            "before </think> scores a tie)")
    judge.add_argument("--temperature", type=float, default=0.6, help="judge sampling temperature (the competition's)")
    judge.add_argument("--top_p", type=float, default=None,
                       help="judge nucleus sampling; default: the judge model's generation_config (as the "
                            "competition's engine filled it: Qwen3-8B's 0.95)")
    judge.add_argument("--top_k", type=int, default=None,
                       help="judge top-k sampling; default: the judge model's generation_config (Qwen3-8B's 20)")
    judge.add_argument("--repetition_penalty", type=float, default=None,
                       help="judge repetition penalty; default: the judge model's generation_config (else 1)")
    judge.add_argument("--tensor_parallel_size", type=int, default=1, help="GPUs for the judge (vLLM)")
    judge.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vLLM's share of GPU memory")
    judge.add_argument("--max_model_len", type=int, default=None, help="vLLM context length")
    judge.add_argument("--backend", default="auto", choices=BACKENDS, help="inference engine for the judge")
    judge.add_argument("--batch_size", type=int, default=8, help="prompts per batch (transformers backend)")
    judge.add_argument("--seed", type=int, default=0, help="sampling seed: two runs of the same judge agree")
    bool_arg(judge, "--judge_both_orders", False,
             "judge each pair twice, the answers swapped the second time (a disagreement is a tie) and report the "
             "position bias (off: the competition judged one order)")
    judge.add_argument("--judge_record", default=None,
                       help="where every judge call is recorded (default: <out>.judge.jsonl)")
    judge.add_argument("--judge_replay", default=None,
                       help="a judge record: score from its replies, no judge loaded or called")
    bool_arg(judge, "--judge_replay_force", False, "replay a record made with another prompt or judge model")
    service = parser.add_argument_group("judge as a service (an OpenAI-compatible server: vllm serve MODEL)")
    service.add_argument("--judge_api_base", default=None,
                         help="the server's base URL, e.g. http://127.0.0.1:8000/v1; --model_path is then the "
                              "served model's name")
    service.add_argument("--judge_api_key_env", default="OPENAI_API_KEY",
                         help="environment variable holding the API key (never written anywhere)")
    service.add_argument("--judge_concurrency", type=int, default=4, help="calls in flight at once")
    service.add_argument("--judge_timeout", type=float, default=600.0, help="seconds per attempt of a call")
    service.add_argument("--judge_retries", type=int, default=3,
                         help="retries of a call on 429, 5xx, timeouts and connection errors (exponential backoff)")
    bool_arg(judge, "--trust_remote_code", False, "allow the judge folder's own Python code to run")
    return parser.parse_args(argv)


def load_judge_prompt(path: str | None) -> str:
    """The judge prompt: the file's exact text (no newline stripped), or the project's default."""
    if path is None:
        return DEFAULT_JUDGE_PROMPT
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--judge_prompt {file}: file not found")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"--judge_prompt {file}: not UTF-8 text ({err})") from None
    try:
        return check_judge_prompt(text, f"--judge_prompt {file}")
    except ValueError as err:
        raise UserError(str(err)) from None


def judge_sampling(args: argparse.Namespace):
    from evals.judge import JudgeSampling

    return JudgeSampling(max_tokens=args.judge_max_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def in_process_calls(args: argparse.Namespace, jobs: list[tuple[int, str, str]]) -> list[dict]:
    """The judge loaded here (vLLM or transformers): every message through the judge's chat template, one
    recorded row per message, as the service's."""
    from transformers import AutoTokenizer

    from evals.judge import request_of

    tokenizer = AutoTokenizer.from_pretrained(args.model_path, trust_remote_code=args.trust_remote_code)
    texts = [text for _, _, text in jobs]
    if tokenizer.chat_template:
        prompts = build_prompts(texts, None, tokenizer)
    else:
        logger.warning("the judge's tokenizer has no chat template: the prompts are sent as plain text")
        prompts = texts
    sampling = judge_sampling(args)  # what the service is sent, so what the record says, is what runs here
    config = GenerationConfig(max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
                              top_p=sampling.top_p, top_k=sampling.top_k,
                              repetition_penalty=sampling.repetition_penalty, seed=sampling.seed,
                              batch_size=args.batch_size, tensor_parallel_size=args.tensor_parallel_size,
                              gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                              trust_remote_code=args.trust_remote_code)
    replies = generate(args.model_path, prompts, config, backend=args.backend) if prompts else []
    return [{"type": "call", "index": i, "order": order, "request": request_of(args.model_path, text, sampling),
             "reply": reply, "error": None, **dict(zip(("verdict", "why"), verdict_and_reason(reply), strict=True)),
             "attempts": 1, "latency_s": None, "served_model": None}
            for (i, order, text), reply in zip(jobs, replies, strict=True)]


def judge_calls(args: argparse.Namespace, prompt: str, jobs: list[tuple[int, str, str]],
                record_path: Path | None) -> tuple[list[dict], dict | None]:
    """The judge's rows for ``jobs``, from the record (``--judge_replay``), the service or the judge loaded here,
    and the record's header (None when replaying)."""
    import os

    from evals.judge import ServiceJudge, header, read_record, replayed

    if args.judge_replay:
        _, rows = read_record(Path(args.judge_replay), prompt, args.model_path, args.judge_replay_force)
        return replayed(rows, jobs, Path(args.judge_replay)), None
    sampling = judge_sampling(args)
    if args.judge_api_base:
        if args.judge_concurrency < 1 or args.judge_timeout <= 0 or args.judge_retries < 0:
            raise UserError("--judge_concurrency must be at least 1, --judge_timeout above 0, --judge_retries "
                            "at least 0")
        service = ServiceJudge(args.judge_api_base, args.model_path, os.environ.get(args.judge_api_key_env, ""),
                               sampling, args.judge_concurrency, args.judge_timeout, args.judge_retries)
        served = service.check()  # unreachable server, wrong model: one line, before anything is written
        head = header(prompt, args.judge_api_base, args.model_path, served, sampling, args.judge_both_orders)
        return service.ask(jobs), head
    check_model_folder(args.model_path, "--model_path (--model_name)")
    head = header(prompt, None, args.model_path, None, sampling, args.judge_both_orders)
    return in_process_calls(args, jobs), head


def print_table(record: dict) -> None:
    def fmt(value):
        return "-" if value is None else f"{value:.4f}"

    counts, judge = record["counts"], record["judge"]
    rows = [("privacy ROUGE-L (lower is better)", fmt(record["rouge_l_privacy"]), counts["privacy"]),
            ("noun-definition ROUGE-L", fmt(record["rouge_l_noun"]), counts["noun_definition"]),
            ("choice accuracy", fmt(record["choice_acc"]), counts["choice"]),
            ("qa win rate (judge)", fmt(record["participant_win"]), counts["qa"]),
            ("score", fmt(record["score"]), sum(counts.values()))]
    print(f"{'metric':<36}{'value':>10}{'items':>8}")
    for name, value, n in rows:
        print(f"{name:<36}{value:>10}{n:>8}")
    if record["left_out"]:
        print(f"left out of the score (--allow_missing_categories): {', '.join(record['left_out'])}")
    if counts["other"]:
        print(f"{counts['other']} items without a category prefix were not scored")
    if judge:
        from evals.judge import summary_line

        print(f"judge: {judge['win']} win / {judge['tie']} tie / {judge['loss']} loss"
              + (f" / {judge['failed']} failed (left out of the win rate)" if judge.get("failed") else ""))
        if "calls" in judge:
            print(summary_line(judge))
    else:
        print("judge skipped (--model_path none): score and win rate are not computed")


def check_categories(args: argparse.Namespace, items: list, use_judge: bool) -> None:
    """Before any model loads: warn about uncategorised items; a needed category with no item is an error
    (or, with --allow_missing_categories, a warning that the score leaves it out); so is a choice item
    whose gold answer has no 【答案】."""
    cats = [category(it.name_key) for it in items]
    for number, (it, cat) in enumerate(zip(items, cats, strict=True), start=1):
        if cat == "choice" and choice_answer(it.answer) is None:
            raise UserError(f"{args.test_data}, item {number}: choice item {it.name_key!r}: the gold answer "
                            f"(its answer turn) has no {ANSWER_MARKER}")
    if cats.count(None):
        logger.warning("%d of %d items of %s have no category prefix (privacy, noun_definition, choice, qa) in "
                       "their name_key: counted as 'other' and not scored", cats.count(None), len(cats), args.test_data)
    needed = ["privacy", "noun_definition", "choice"] + (["qa"] if use_judge else [])
    missing = [c for c in needed if c not in cats]
    if missing and not args.allow_missing_categories:
        raise UserError(f"{args.test_data}: no item in categor{'y' if len(missing) == 1 else 'ies'} "
                        f"{', '.join(missing)} (name_key prefix); the ATEC score needs each. Pass "
                        "--allow_missing_categories to leave the missing terms out of the score")
    if missing:
        logger.warning("--allow_missing_categories: the score leaves out %s", ", ".join(missing))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging()
    items = load_qa_jsonl(args.test_data)
    unlearned = load_predictions(args.user_out_path, args.test_data, len(items))
    check_output_free(args.out, args.overwrite, "--out (--out_path)")
    if args.details_path:
        check_output_free(args.details_path, args.overwrite, "--details_path")
    use_judge = args.model_path.lower() != "none"
    if not use_judge and (args.judge_api_base or args.judge_replay):
        raise UserError(f"{'--judge_api_base' if args.judge_api_base else '--judge_replay'} needs --model_name "
                        "(the judge model: the served model's name, or the one the record was made with)")
    keys = [it.name_key for it in items]
    check_categories(args, items, use_judge)
    prompt = load_judge_prompt(args.judge_prompt)
    qa_index = [i for i, key in enumerate(keys) if category(key) == "qa"]
    verdicts, replies, counts = None, {}, {}
    if use_judge:
        from evals.judge import combine, jobs_for, write_record

        if args.we_out_path is None:
            raise UserError("--we_out_path (the original model's answers) is needed by the judge")
        record_path = None if args.judge_replay else Path(args.judge_record or f"{args.out}.judge.jsonl")
        if record_path is not None:
            check_output_free(record_path, args.overwrite, "--judge_record")
        original = load_predictions(args.we_out_path, args.test_data, len(items))
        jobs = jobs_for(prompt, [it.question for it in items], original, unlearned, qa_index,
                        args.judge_both_orders)
        rows, head = judge_calls(args, prompt, jobs, record_path)
        if record_path is not None:
            write_record(record_path, head, rows)
        verdicts, counts = combine(rows)
        replies = {r["index"]: r["reply"] for r in rows if r["order"] == "original_first"}
        if counts["failed_calls"]:
            logger.warning("%d of %d judge calls failed (see %s): their items are left out of the win rate",
                           counts["failed_calls"], counts["calls"], record_path or args.judge_replay)
    try:
        result = atec_score(keys, [it.answer for it in items], unlearned, verdicts,
                            allow_missing=args.allow_missing_categories)
    except (MissingCategoryError, ValueError) as err:
        raise UserError(f"{args.test_data}: {err}") from None
    record = result.as_record()
    if record["judge"]:
        record["judge"].update(counts)
    write_json(args.out, record, indent=None)
    if args.details_path:
        write_jsonl(args.details_path, [{**d, **({"judge_reply": replies[d["index"]]} if d["index"] in replies
                                                else {})} for d in result.details])
    print_table(record)
    print(f"scores written to {args.out}: {json.dumps(record, ensure_ascii=False)}")
    return record


if __name__ == "__main__":
    run_cli(main)
