"""The robustness attacks end to end: every attack on one model (:func:`attack_model`), and the report that sets
the model's results beside its control's (:func:`build_report`). The scores are :mod:`evals.robustness`'s;
relearning is :mod:`trainer.relearn`. ``evaluate_robustness.py`` and ``bench/robustness.py`` call these.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evals.shard import SINGLE, Shard
from trainer.relearn import RelearnSettings, relearn
from utils.chat_template import ChatTemplate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttackSettings:
    """Which attacks and how: relearning (``relearn``; ``rtt`` per fold), the step curve (its last step is the
    attack's length), the probes, the 4-bit type; generation and scoring as the other evaluations."""

    attacks: tuple[str, ...]
    relearn: RelearnSettings = RelearnSettings()
    rtt: RelearnSettings = RelearnSettings()
    rtt_folds: int = 5
    curve: tuple[int, ...] = ()
    leak_threshold: float = 0.5
    context_facts: int = 3
    quant4_type: str = "nf4"
    max_new_tokens: int = 64
    batch_size: int = 8
    seed: int = 0
    dtype: str = "auto"
    trust_remote_code: bool = False


@dataclass
class AttackData:
    """The sets (``forget`` required; ``retain``, ``holdout``), refusal sentences and the forget items'
    paraphrased questions (None where an item has none)."""

    sets: Mapping[str, Sequence[tuple[str, str]]]
    refusals: Sequence[str] = ()
    paraphrases: Sequence[str | None] = field(default_factory=list)


def merged_folder(model_path: str | Path, adapter: str | Path | None, dtype: str, trust: bool, tmp: Path,
                  shard: Shard = SINGLE) -> Path:
    """The folder attacks load from: ``model_path`` itself, or with ``adapter`` merged in, written to the main
    process's ``tmp`` (transformers saves on rank 0 only once a process group is up); every process gets that
    folder, after it is written."""
    if adapter is None:
        return Path(model_path)
    if shard.is_main:
        from utils.loading import load_for_eval

        model, tokenizer = load_for_eval(model_path, adapter, dtype, trust)
        model = model.merge_and_unload()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
    folder = Path(shard.share(str(tmp)))
    shard.barrier()
    return folder


def logit_change(full, quantised, tokenizer, template: ChatTemplate, pair: tuple[str, str]) -> float:
    """Mean absolute difference of two models' logits over one item's tokens (shows the quantiser ran)."""
    import torch

    ids = tokenizer(template.prompt(pair[0]) + pair[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = full(input_ids=ids.to(full.device)).logits.float().cpu()
        b = quantised(input_ids=ids.to(quantised.device)).logits.float().cpu()
    return float((a - b).abs().mean())


class _Scorer:
    """One model folder's evaluations: fresh copies for each attack, the sets scored by
    :func:`evals.unlearning.evaluate_sets` (no GradNorm), reduced to :func:`evals.robustness.metrics_of`."""

    def __init__(self, folder: Path, tokenizer, template: ChatTemplate, data: AttackData, settings: AttackSettings,
                 shard: Shard) -> None:
        from evals.sampling import GenerationConfig

        self.folder, self.tokenizer, self.template = folder, tokenizer, template
        self.data, self.settings, self.shard = data, settings, shard
        self.config = GenerationConfig(max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                                       dtype=settings.dtype, trust_remote_code=settings.trust_remote_code)

    def fresh(self, trains: bool = False, quantization: str | None = None):
        from utils.loading import load_model

        # relearning trains in float32: steps of lr 2e-5 are below bfloat16's resolution for most weights
        dtype = "float32" if trains or quantization else self.settings.dtype
        return load_model(self.folder, dtype=dtype, trust_remote_code=self.settings.trust_remote_code,
                          quantization=quantization)

    def answers(self, model, prompts: list[str]) -> list[str]:
        from evals.generation import generate_with_model

        return generate_with_model(model, self.tokenizer, prompts, self.config, shard=self.shard)

    def log(self, model, sets: Mapping | None = None) -> dict:
        from evals.unlearning import evaluate_sets

        return evaluate_sets(model, self.tokenizer, self.template, sets or self.data.sets, self.data.refusals,
                             lambda prompts: self.answers(model, prompts), gradnorm=False,
                             batch_size=self.settings.batch_size, shard=self.shard)

    def metrics(self, model, sets: Mapping | None = None) -> dict:
        from evals.robustness import metrics_of

        return metrics_of(self.log(model, sets))


def attack_model(folder: Path, who: str, tokenizer, template: ChatTemplate, data: AttackData,
                 settings: AttackSettings, shard: Shard = SINGLE) -> dict:
    """The baseline and every attack's results for the model in ``folder`` (each attack on a fresh copy), with
    the minutes each took."""
    from tqdm.auto import tqdm

    from evals.robustness import QUANT_OF_ATTACK, folds, metrics_of, probe_prompts, probe_scores
    from evals.tofu import rouge_recalls

    scorer = _Scorer(folder, tokenizer, template, data, settings, shard)
    forget = list(data.sets["forget"])
    res: dict = {"minutes": {}}
    bar = tqdm(["baseline", *settings.attacks], desc=f"attacks on the {who}", unit="attack",
               disable=not shard.is_main)
    for attack in bar:
        bar.set_postfix_str(attack)
        start = time.perf_counter()
        if attack == "baseline":
            res["baseline"] = scorer.metrics(scorer.fresh())
        elif attack == "relearn":
            looks: list = []
            model, steps = relearn(scorer.fresh(trains=True), tokenizer, template, forget, settings.relearn,
                                   look_at=settings.curve[:-1],
                                   on_look=lambda step, m, looks=looks: looks.append(scorer.metrics(m)),
                                   processes=shard.world)
            res["relearn"] = scorer.metrics(model)
            res["relearn_steps"] = steps
            if settings.curve:
                res["relearn_curve"] = [*looks, res["relearn"]]
        elif attack == "rtt":
            parts = folds(len(forget), settings.rtt_folds, settings.seed)
            rows: list = []
            for held in parts:
                model, _ = relearn(scorer.fresh(trains=True), tokenizer, template,
                                   [p for i, p in enumerate(forget) if i not in held], settings.rtt,
                                   processes=shard.world)
                rows += scorer.log(model, {"forget": [forget[i] for i in held]})["forget"]
            res["rtt"] = metrics_of({"forget": rows})
            res["rtt_folds"] = parts
        elif attack in QUANT_OF_ATTACK:
            kind = QUANT_OF_ATTACK[attack] if attack == "quant8" else settings.quant4_type
            model = scorer.fresh(quantization=kind)
            res[attack] = scorer.metrics(model)
            res[f"{attack}_logit_change"] = logit_change(scorer.fresh(trains=True), model, tokenizer, template,
                                                         forget[0])
            res[f"{attack}_type"] = kind
        elif attack == "probe":
            prompts = probe_prompts(template, forget, data.paraphrases, settings.context_facts, settings.seed)
            flat = [(name, i, p) for name, ps in prompts.items() for i, p in enumerate(ps) if p is not None]
            answers = scorer.answers(scorer.fresh(), [p for _, _, p in flat])
            _, recall = rouge_recalls([forget[i][1] for _, i, _ in flat], answers)
            recalls: dict = {name: [None] * len(forget) for name in prompts}
            for (name, i, _), r in zip(flat, recall, strict=True):
                recalls[name][i] = r
            res["probe"] = probe_scores(recalls, settings.leak_threshold)
        res["minutes"][attack] = round((time.perf_counter() - start) / 60, 3)
    return res


def build_report(model: Mapping, control: Mapping, original: Mapping | None, attacks: Sequence[str],
                 curve: Sequence[int] = ()) -> dict:
    """The baseline and, per attack, the model's and the control's metrics, R (relearn, rtt) or Q (quant8, quant4;
    the control's Q beside), rtt's recovery of the control-to-original gap, and a verdict line."""
    from evals.robustness import gap_recovery, per_metric, quant_robustness, relearn_robustness, verdict

    baseline = {"model": model["baseline"], "control": control["baseline"]}
    if original is not None:
        baseline["original"] = original["baseline"]
    out: dict = {"baseline": baseline, "attacks": {}}
    for attack in attacks:
        entry: dict = {"model": model[attack], "control": control[attack]}
        if attack in ("relearn", "rtt"):
            entry["R"] = per_metric(relearn_robustness, model["baseline"], model[attack], control["baseline"],
                                    control[attack])
        elif attack != "probe":
            entry["Q"] = per_metric(quant_robustness, model["baseline"], model[attack])
            entry["Q_control"] = per_metric(quant_robustness, control["baseline"], control[attack])
            entry["logit_change"] = {"model": model[f"{attack}_logit_change"],
                                     "control": control[f"{attack}_logit_change"]}
            entry["type"] = model[f"{attack}_type"]
        if attack == "relearn":
            entry["steps"] = model["relearn_steps"]
            if curve:
                entry["curve"] = {"steps": list(curve), "model": model["relearn_curve"],
                                  "control": control["relearn_curve"]}
        if attack == "rtt":
            entry["folds"] = model["rtt_folds"]
            if original is not None:
                entry["recovery"] = per_metric(gap_recovery, model["rtt"], control["rtt"], baseline["original"])
        entry["minutes"] = {"model": model["minutes"][attack], "control": control["minutes"][attack]}
        entry["verdict"] = verdict(attack, entry, baseline)
        out["attacks"][attack] = entry
    return out
