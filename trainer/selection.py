"""Evaluation during training and a stopping rule declared before it: which step's weights a run hands over.

Every ``--eval_steps`` optimizer steps (or at each epoch's end, ``--eval_strategy epoch``), and once before the
first step, the model is scored on the evaluation sets with the cheap metrics of :func:`evals.robustness.metrics_of`
(answer probability, EM, ES, the MIA AUCs of forget vs holdout; greedy ROUGE-L with ``--eval_generate``), split
over the processes like the stand-alone evaluations. The row goes to ``train_log.jsonl`` and the trackers
(``eval_<metric>``). The rule, fixed in ``run_args.json`` before training starts, picks one evaluated step:

- ``best:<metric>``: the step with the best value (forget metrics: lowest; MIA AUCs: closest to 0.5, neither
  member-like nor over-unlearned; retain metrics: highest), the open-unlearning #187 request;
- ``first_below:<metric>=<value>``: the first step whose metric falls to ``value`` or under, MUSE's rule with a
  retain-only model's value;

both among the steps whose utility (``--utility_metric``, default retain answer probability) keeps at least
``--utility_floor`` of the starting model's (0.8: OpenUnlearning drops runs that lose more than 20 %). The chosen
step's weights are saved to ``<run>/selected/`` when it is evaluated, with ``selection.json`` (step, value,
rule, why) there and in the run folder.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from evals.robustness import KNOWLEDGE, UTILITY
from utils.errors import UserError

logger = logging.getLogger(__name__)

SELECTED_DIR = "selected"
SELECTION_FILE = "selection.json"
PREFIX = "eval_"
METRICS = (*KNOWLEDGE, *UTILITY)


@dataclass(frozen=True)
class SelectRule:
    """``kind`` is ``best`` or ``first_below``; ``threshold`` only for ``first_below``."""

    kind: str
    metric: str
    threshold: float | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.metric}" + ("" if self.threshold is None else f"={self.threshold:g}")


def parse_rule(text: str) -> SelectRule | None:
    """``--select``'s value as a rule (``none``: no rule); a malformed value is a :class:`UserError`."""
    if text in ("", "none"):
        return None
    kind, _, rest = text.partition(":")
    metric, _, value = rest.partition("=")
    if kind not in ("best", "first_below") or metric not in METRICS:
        raise UserError(f"--select {text}: expected best:<metric> or first_below:<metric>=<value>, the metric one "
                        f"of {', '.join(METRICS)}")
    if kind == "best":
        if value:
            raise UserError(f"--select {text}: best:<metric> takes no value")
        return SelectRule(kind, metric)
    try:
        threshold = float(value)
    except ValueError:
        raise UserError(f"--select {text}: first_below needs a number after '=' (e.g. a retain-only model's "
                        "value of the metric)") from None
    return SelectRule(kind, metric, threshold)


def badness(metric: str, value: float) -> float:
    """Lower is better: forget metrics as they are, MIA AUCs as their distance to 0.5, retain metrics negated."""
    if metric in UTILITY:
        return -value
    if metric.startswith("auc_"):
        return abs(value - 0.5)
    return value


def choose(rows: Sequence[Mapping], rule: SelectRule, utility_metric: str = "retain_prob",
           utility_floor: float = 0.8) -> tuple[dict | None, str]:
    """The selected row of evaluation ``rows`` (``{"step": s, "eval_<metric>": v, ...}``, step 0 first: the
    starting model, never a candidate) and why, or ``(None, why not)``."""
    rows = sorted(rows, key=lambda r: r["step"])
    if not rows or rows[0]["step"] != 0:
        return None, "no evaluation of the starting model (step 0) to hold the utility floor against"
    start = rows[0].get(PREFIX + utility_metric)
    key = PREFIX + rule.metric

    def usable(row: Mapping) -> bool:
        value = row.get(key)
        return value is not None and not (isinstance(value, float) and math.isnan(value))

    floor = None if start is None else utility_floor * start
    def kept_utility(row: Mapping) -> bool:
        value = row.get(PREFIX + utility_metric)
        return floor is None or (value is not None and value >= floor)

    kept = [r for r in rows[1:] if usable(r) and kept_utility(r)]
    where = (f"{utility_metric} >= {utility_floor:g} x the starting {start:.4g}" if floor is not None
             else f"no {utility_metric} to hold a floor against")
    if not kept:
        return None, f"no evaluated step after the start has {rule.metric} with {where}"
    if rule.kind == "best":
        best = min(kept, key=lambda r: (badness(rule.metric, r[key]), r["step"]))
        return dict(best), f"best {rule.metric} ({best[key]:.4g}) of {len(kept)} steps with {where}"
    for row in kept:
        if row[key] <= rule.threshold:
            return dict(row), (f"first step with {rule.metric} {row[key]:.4g} <= {rule.threshold:g}, "
                               f"among steps with {where}")
    return None, f"no step with {where} reached {rule.metric} <= {rule.threshold:g}"


@dataclass(frozen=True)
class EvalSettings:
    """When and how the run evaluates itself, and the rule that picks its step."""

    strategy: str = "no"  # no | steps | epoch
    steps: int = 0
    generate: bool = False
    max_new_tokens: int = 32
    batch_size: int = 8
    rule: SelectRule | None = None
    utility_metric: str = "retain_prob"
    utility_floor: float = 0.8


class EvalCallback(TrainerCallback):
    """Scores the model before the first step and at each evaluation point, logs the row through
    ``trainer.log`` (train_log.jsonl, trackers), and saves the step the rule chooses to ``<run>/selected/``.
    Every process takes part (each scores its share of the batches and saves under DeepSpeed as the Trainer
    does); the gathered rows are the same on every process, so every process makes the same choice."""

    def __init__(self, trainer, tokenizer, template, sets: dict[str, list[tuple[str, str]]], out_dir: Path,
                 settings: EvalSettings, rows: Sequence[Mapping] = ()) -> None:
        from evals.shard import Shard

        self.trainer, self.tokenizer, self.template, self.sets = trainer, tokenizer, template, sets
        self.out_dir, self.settings = out_dir, settings
        self.shard = Shard(trainer.accelerator.process_index, trainer.accelerator.num_processes)
        self.rows = [dict(r) for r in rows]
        self.chosen_step = saved_step(out_dir, settings.rule)
        if settings.rule is not None and self.rows:
            row, _ = choose(self.rows, settings.rule, settings.utility_metric, settings.utility_floor)
            if row is not None and row["step"] != self.chosen_step:
                # resumed after the chosen step's weights were replaced by a later, unfinished choice: choose
                # again among the steps from here on (step 0 stays the utility reference)
                last = max(r["step"] for r in self.rows)
                logger.warning("step %d's weights (chosen before the resume) are not in %s/: the selection "
                               "starts again among the steps after %d", row["step"], SELECTED_DIR, last)
                self.rows = [r for r in self.rows if r["step"] == 0]
                self.chosen_step = None

    def metrics(self) -> dict[str, float]:
        """The model as it is now, scored on the evaluation sets."""
        from evals.robustness import quick_metrics

        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        return quick_metrics(model, self.tokenizer, self.template, self.sets, self.settings.generate,
                             self.settings.max_new_tokens, self.settings.batch_size, self.shard)

    def evaluate(self, state) -> None:
        row = {"step": state.global_step, **{PREFIX + k: v for k, v in self.metrics().items()}}
        self.rows = [r for r in self.rows if r["step"] != row["step"]] + [row]
        self.trainer.log({k: v for k, v in row.items() if k != "step"})
        if self.settings.rule is None or state.global_step == 0:
            return
        chosen, why = choose(self.rows, self.settings.rule, self.settings.utility_metric,
                             self.settings.utility_floor)
        if chosen is not None and chosen["step"] == state.global_step and chosen["step"] != self.chosen_step:
            self.save(chosen, why)

    def save(self, row: Mapping, why: str) -> None:
        from trainer.saving import save_final
        from utils.files import write_json

        record = self.record(row, why)
        # the record goes into the folder before it is swapped in: weights and record change together
        save_final(self.trainer, self.out_dir, SELECTED_DIR, extra_json={SELECTION_FILE: record})
        self.chosen_step = row["step"]
        if self.shard.is_main:
            write_json(self.out_dir / SELECTION_FILE, record)
        logger.info("selected step %d: %s", row["step"], why)

    def record(self, row: Mapping | None, why: str) -> dict:
        return {"rule": str(self.settings.rule), "utility_metric": self.settings.utility_metric,
                "utility_floor": self.settings.utility_floor, "step": None if row is None else row["step"],
                "value": None if row is None else row.get(PREFIX + self.settings.rule.metric), "why": why,
                "row": None if row is None else dict(row), "folder": None if row is None else SELECTED_DIR}

    def on_train_begin(self, args, state, control, **kwargs):
        if not any(r["step"] == 0 for r in self.rows):
            self.evaluate(state)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.settings.strategy == "steps" and state.global_step % self.settings.steps == 0:
            self.evaluate(state)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.settings.strategy == "epoch":
            self.evaluate(state)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if not any(r["step"] == state.global_step for r in self.rows):
            self.evaluate(state)  # the final weights are always scored
        if self.settings.rule is None or not self.shard.is_main:
            return control
        from utils.files import write_json

        row, why = choose(self.rows, self.settings.rule, self.settings.utility_metric, self.settings.utility_floor)
        if row is not None and row["step"] == self.chosen_step:  # the same step, the reason over every step
            for folder in (self.out_dir / SELECTED_DIR, self.out_dir):
                write_json(folder / SELECTION_FILE, self.record(row, why))
        elif self.chosen_step is None:
            write_json(self.out_dir / SELECTION_FILE, self.record(None, why))
            logger.warning("--select %s chose no step: %s; %s/ was not written", self.settings.rule, why,
                           SELECTED_DIR)
        return control


def saved_record(out_dir: Path) -> dict:
    """The record inside ``<run>/selected/`` (which step's weights are there, under which rule), or {}."""
    import json

    record = out_dir / SELECTED_DIR / SELECTION_FILE
    try:
        saved = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    except ValueError:
        return {}
    return saved if isinstance(saved, dict) else {}


def saved_step(out_dir: Path, rule: SelectRule | None) -> int | None:
    """The step whose weights are in ``<run>/selected/`` under ``rule``, or None."""
    saved = saved_record(out_dir)
    return saved.get("step") if rule is not None and saved.get("rule") == str(rule) else None


def eval_rows(rows: Sequence[Mapping]) -> list[dict]:
    """The evaluation rows of a train log (those with ``eval_`` metrics), one per step, the latest kept."""
    by_step: dict[int, dict] = {}
    for row in rows:
        if any(k.startswith(PREFIX) for k in row):
            by_step[row["step"]] = {"step": row["step"], **{k: v for k, v in row.items() if k.startswith(PREFIX)}}
    return [by_step[s] for s in sorted(by_step)]
