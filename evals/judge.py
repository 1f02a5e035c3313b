"""The judge as a service: an OpenAI-compatible ``/v1/chat/completions`` endpoint (``vllm serve``, or any server
that speaks it) asked through the ``openai`` client, every call recorded, and the record replayable.

The prompt (:func:`evals.atec.judge_messages`), the verdict rule (:func:`evals.atec.verdict_and_reason`) and the
sampling settings (:class:`JudgeSampling`) are the in-process judge's. The client retries 429, 5xx and
connection errors with exponential backoff (the ``openai`` client's own ``max_retries``) and gives up on a call
after ``timeout`` seconds per attempt; a call that still fails is **failed**, never a tie: it is recorded with its
error, counted, and its item is left out of the win rate.

The record (``<out>.judge.jsonl``): a header line (the prompt's sha256, the model asked for and the one the
server reports, the sampling settings, the API base; never the key) and one line per call (item index, the order
of the two answers, the full request, the raw reply, latency, attempts, error, verdict and why).
``--judge_replay RECORD`` scores again from it without any request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from evals.atec import judge_messages, verdict_and_reason
from utils.errors import UserError

logger = logging.getLogger(__name__)

ORDERS = ("original_first", "swapped")  # swapped: the unlearned model's answer in the first slot
FLIP = {"win": "loss", "loss": "win", "tie": "tie"}


@dataclass(frozen=True)
class JudgeSampling:
    """The judge's sampling settings, as sent to the server (top_k and repetition_penalty as vLLM's extra
    parameters; None: the server's default)."""

    max_tokens: int = 8192
    temperature: float = 0.6
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = 0


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def request_of(model: str, text: str, sampling: JudgeSampling) -> dict:
    """The chat-completions request for one judge message (what is sent and what is recorded)."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature}
    for key in ("top_p", "seed"):
        if getattr(sampling, key) is not None:
            body[key] = getattr(sampling, key)
    extra = {k: getattr(sampling, k) for k in ("top_k", "repetition_penalty") if getattr(sampling, k) is not None}
    if extra:
        body["extra_body"] = extra
    return body


def reply_text(message) -> str:
    """The reply as the competition's rule reads it: a server that splits the thinking off
    (``reasoning_content``, vLLM's reasoning parsers) gets it joined back before ``</think>``."""
    content = message.content or ""
    reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)
    if reasoning and "</think>" not in content:
        return f"{reasoning}</think>{content}"
    return content


class ServiceJudge:
    """A judge behind an OpenAI-compatible endpoint."""

    def __init__(self, api_base: str, model: str, api_key: str, sampling: JudgeSampling, concurrency: int = 4,
                 timeout: float = 600.0, retries: int = 3) -> None:
        from openai import OpenAI

        self.api_base, self.model, self.sampling = api_base, model, sampling
        self.concurrency = concurrency
        self.client = OpenAI(base_url=api_base, api_key=api_key or "EMPTY", timeout=timeout, max_retries=retries)
        self.server_model: str | None = None

    def check(self) -> str:
        """The server's model list holds ``model`` (else one clear error); returns the model the server reports."""
        import openai

        try:
            served = list(self.client.with_options(max_retries=1).models.list())
        except openai.APIConnectionError as err:
            raise UserError(f"--judge_api_base {self.api_base}: the server cannot be reached ({err}); is it "
                            "running (vllm serve MODEL --port N) and is the address right?") from None
        except openai.APIStatusError as err:
            raise UserError(f"--judge_api_base {self.api_base}: the server answered {err.status_code} to "
                            f"GET /models ({err.message})") from None
        ids = [m.id for m in served]
        if self.model not in ids:
            raise UserError(f"--model_name {self.model}: the server at {self.api_base} serves "
                            f"{', '.join(ids) or 'no model'}; pass one of them")
        entry = served[ids.index(self.model)]
        # what the server says it runs: vLLM's `root` (the weights' path or hub id) when it gives one
        self.server_model = getattr(entry, "root", None) or entry.id
        return self.server_model

    def call(self, index: int, order: str, text: str) -> dict:
        """One recorded call (never raises for a failed request: the record says why)."""
        import openai

        request = request_of(self.model, text, self.sampling)
        start = time.perf_counter()
        row = {"type": "call", "index": index, "order": order, "request": request}
        try:
            raw = self.client.chat.completions.with_raw_response.create(**request)
            completion = raw.parse()
            reply = reply_text(completion.choices[0].message)
            verdict, why = verdict_and_reason(reply)
            row.update(reply=reply, error=None, verdict=verdict, why=why, attempts=raw.retries_taken + 1,
                       served_model=completion.model)
        except Exception as err:  # noqa: BLE001 - after the client's retries; a malformed reply too: recorded
            status = getattr(err, "status_code", None) if isinstance(err, openai.APIError) else None
            row.update(reply=None, error=f"{type(err).__name__}{f' {status}' if status else ''}: {err}",
                       verdict=None, why="the call failed; the item is left out of the win rate",
                       attempts=None, served_model=None)
        row["latency_s"] = round(time.perf_counter() - start, 3)
        return row

    def ask(self, jobs: Sequence[tuple[int, str, str]]) -> list[dict]:
        """Call for every ``(index, order, text)``, at most ``concurrency`` at a time; rows in the jobs' order."""
        from tqdm.auto import tqdm

        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            futures = [pool.submit(self.call, *job) for job in jobs]
            return [f.result() for f in tqdm(futures, desc="judge calls", unit="call")]


def header(prompt: str, api_base: str | None, model: str, served: str | None, sampling: JudgeSampling,
           both_orders: bool) -> dict:
    return {"type": "header", "prompt_sha256": prompt_sha256(prompt), "model": model, "server_model": served,
            "api_base": api_base, "sampling": asdict(sampling), "both_orders": both_orders}


def jobs_for(prompt: str, questions: Sequence[str], original: Sequence[str], unlearned: Sequence[str],
             index: Sequence[int], both_orders: bool) -> list[tuple[int, str, str]]:
    """The judge messages: the original model's answer first (the competition's order), and with
    ``both_orders`` also swapped."""
    q, a, b = ([xs[i] for i in index] for xs in (questions, original, unlearned))
    jobs = [(i, ORDERS[0], text) for i, text in zip(index, judge_messages(prompt, q, a, b), strict=True)]
    if both_orders:
        jobs += [(i, ORDERS[1], text) for i, text in zip(index, judge_messages(prompt, q, b, a), strict=True)]
    return jobs


def combine(rows: Sequence[Mapping]) -> tuple[dict[int, str], dict]:
    """Verdicts by item (the unlearned model's result) and the counts: failed calls, replies without
    ``</think>`` (ties by the competition's rule), replies with no verdict word after it (ties too), and with
    both orders, how often the two orders disagreed and how often the first slot won."""
    by_item: dict[int, dict[str, Mapping]] = {}
    for row in rows:
        by_item.setdefault(row["index"], {})[row["order"]] = row
    counts = {"calls": len(rows), "failed_calls": sum(r["verdict"] is None for r in rows),
              "no_think": sum(r["verdict"] is not None and "</think>" not in (r["reply"] or "") for r in rows),
              "no_verdict_word": sum((r.get("why") or "").startswith("no verdict word") for r in rows)}
    verdicts: dict[int, str] = {}
    both = [orders for orders in by_item.values() if len(orders) == 2]
    if both:
        disagree, first_wins, judged = 0, 0, 0
        for orders in both:
            a, b = orders[ORDERS[0]]["verdict"], orders[ORDERS[1]]["verdict"]
            if a is None or b is None:
                continue
            judged += 1
            b = FLIP[b]  # the swapped call's verdict, back to the unlearned model's result
            disagree += a != b
            # first slot wins: the original model wins when first (loss), the unlearned one when first (win)
            first_wins += (a == "loss") + (b == "win")
        counts.update(order_disagreements=disagree, pairs_both_orders=judged,
                      first_slot_win_rate=first_wins / (2 * judged) if judged else None)
    for i, orders in by_item.items():
        results = [FLIP[r["verdict"]] if order == ORDERS[1] else r["verdict"] for order, r in orders.items()
                   if r["verdict"] is not None]
        if len(results) != len(orders) or not results:
            continue  # a failed call: the item is not judged
        verdicts[i] = results[0] if len(set(results)) == 1 else "tie"  # the orders disagree: a tie
    return verdicts, counts


def write_record(path: Path, head: Mapping, rows: Sequence[Mapping]) -> None:
    from utils.files import write_jsonl

    write_jsonl(path, [dict(head), *rows])


def read_record(path: Path, prompt: str, model: str, force: bool) -> tuple[dict, list[dict]]:
    """A judge record's header and calls; a prompt or model other than the record's is an error unless
    ``force``."""
    from dataset.reading import iter_jsonl

    if not path.is_file():
        raise UserError(f"--judge_replay {path}: file not found")
    lines = list(iter_jsonl(path))
    if not lines or not isinstance(lines[0][1], dict) or lines[0][1].get("type") != "header":
        raise UserError(f"--judge_replay {path}, line 1: expected the record's header (type 'header')")
    head = lines[0][1]
    rows = []
    for number, obj in lines[1:]:
        if not isinstance(obj, dict) or obj.get("type") != "call" or "index" not in obj or "order" not in obj:
            raise UserError(f"--judge_replay {path}, line {number}: expected a call (type 'call', index, order)")
        rows.append(obj)
    problems = []
    if head.get("prompt_sha256") != prompt_sha256(prompt):
        problems.append("the judge prompt differs from the record's (its sha256)")
    if head.get("model") != model:
        problems.append(f"the record's judge is {head.get('model')!r}, not {model!r}")
    if problems and not force:
        raise UserError(f"--judge_replay {path}: {'; '.join(problems)}; pass --judge_replay_force to score it anyway")
    for row in rows:  # the verdict again from the recorded reply: the rule is the code's, not the record's
        if row.get("reply") is not None:
            row["verdict"], row["why"] = verdict_and_reason(row["reply"])
    return head, rows


def replayed(rows: Sequence[Mapping], jobs: Sequence[tuple[int, str, str]], path: Path) -> list[dict]:
    """The recorded calls for ``jobs``, in their order; a job the record lacks is an error."""
    by_key = {(r["index"], r["order"]): r for r in rows}
    missing = [(i, o) for i, o, _ in jobs if (i, o) not in by_key]
    if missing:
        i, order = missing[0]
        raise UserError(f"--judge_replay {path}: no recorded call for item {i + 1} ({order}); "
                        f"{len(missing)} of {len(jobs)} missing (another test set, or --judge_both_orders?)")
    out = []
    for i, order, text in jobs:
        row = dict(by_key[(i, order)])
        if row.get("request", {}).get("messages", [{}])[0].get("content") != text:
            raise UserError(f"--judge_replay {path}: item {i + 1}'s recorded message is not this run's "
                            "(other answers or questions)")
        out.append(row)
    return out


def summary_line(counts: Mapping) -> str:
    text = (f"judge calls: {counts['calls']}, failed {counts['failed_calls']}, without </think> {counts['no_think']} "
            f"(ties by the competition's rule), no verdict word {counts['no_verdict_word']}")
    if "order_disagreements" in counts:
        rate = counts["first_slot_win_rate"]
        text += (f"; both orders: {counts['order_disagreements']} of {counts['pairs_both_orders']} pairs disagree, "
                 f"first slot wins {'-' if rate is None else f'{rate:.2f}'}")
    return text
