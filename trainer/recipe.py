"""The training path both forget scripts share: validate → build model and data → train → save."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import string
import sys
from pathlib import Path
from typing import NamedTuple

from dataset.data_module import ForgetRetainCollator, ForgetRetainDataset
from dataset.reading import QAItem, load_lines, load_qa_jsonl
from trainer.launch import (
    build_training_args,
    check_deepspeed,
    close_process_group,
    deepspeed_zero_stage,
    use_bf16,
)
from trainer.losses import LOSSES, needs_hidden, needs_idk, needs_reference
from trainer.model_setup import build_model, check_load_in_4bit, load_tokenizer, num_layers
from trainer.saving import FINAL_DIR, FULL_DIR, save_final
from utils.chat_template import PROJECT_ROOT, load_chat_template
from utils.cli import is_main_process
from utils.errors import UserError
from utils.files import check_model_folder, write_json, write_jsonl

logger = logging.getLogger(__name__)


def final_dir_name(args: argparse.Namespace) -> str:
    """``final_lora_model`` for a LoRA run, ``final_model`` when every weight trained (``--lora_r 0``)."""
    return FULL_DIR if args.lora_r == 0 else FINAL_DIR


# The original scripts' per-script defaults (forget_me_gd.py / forget_idk_ap.py of the competition's code), but
# save_steps: 1 epoch here (resumable by default), 10 / 100 in the original (never a checkpoint in a default run).
SCRIPT_DEFAULTS: dict[str, dict] = {
    "me_gd": {"loss_type": "ME+GD", "max_length": 400, "forget_coeff": 0.9, "num_epochs": 5, "save_steps": 1},
    "idk_ap": {"loss_type": "IDK+AP", "max_length": 288, "forget_coeff": 0.5, "num_epochs": 3, "save_steps": 1,
               "output_dir": "${save_root}/${loss_type}_epoch${num_epochs}_${lr}_mask${mask}_${forget_coeff}"
                             "_${regularization_coeff}"},
}
LOG_FILE = "train_log.jsonl"
# forget terms defined on answer tokens (open-unlearning's methods): --mask false deserves a warning
ANSWER_METHODS = frozenset({"SimNPO", "UNDIAL", "WGA", "SatImp", "CE-U", "PDU", "RMU"})
ARGS_FILE = "run_args.json"


def resolve_output_dir(args: argparse.Namespace) -> Path:
    """Fill ``${name}`` placeholders of ``--output_dir`` from the arguments (an unknown name is an error)."""
    values = {k: str(v) for k, v in vars(args).items()}
    try:
        return Path(string.Template(args.output_dir).substitute(values))
    except KeyError as err:
        raise UserError(f"--output_dir: unknown name ${{{err.args[0]}}}; known: {', '.join(sorted(values))}") from None
    except ValueError as err:
        raise UserError(f"--output_dir: {err}") from None


def _resolve_resume(args: argparse.Namespace, out_dir: Path) -> str | None:
    from trainer.checkpoints import latest_checkpoint

    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        found = latest_checkpoint(out_dir)
        if found is None:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s; starting from scratch", out_dir)
            return None
        return str(found)
    path = Path(args.resume_from_checkpoint)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume_from_checkpoint {path}: not a training checkpoint (no trainer_state.json)")
    return str(path)


class TrainingData(NamedTuple):
    """The parsed input files of a run."""

    forget: list[QAItem]
    retain: list[QAItem]
    idk: list[str] | None


def read_data(args: argparse.Namespace) -> TrainingData:
    """Parse the forget/retain files (and the refusals when the loss reads them); errors name file and line."""
    idk = load_lines(args.idk_data_path) if needs_idk(args.loss_type) else None
    return TrainingData(load_qa_jsonl(args.forget_data_path), load_qa_jsonl(args.retain_data_path), idk)


def build_dataset(args: argparse.Namespace, tokenizer, template, data: TrainingData | None = None
                  ) -> ForgetRetainDataset:
    """Tokenise the run's data (read from the files unless ``data`` is given)."""
    forget, retain, idk = data if data is not None else read_data(args)
    return ForgetRetainDataset(forget, retain, tokenizer, template, args.max_length, mask=args.mask, idk_lines=idk,
                               pad_to_max_length=args.pad_to_max_length, retain_sampling=args.retain_sampling,
                               seed=args.seed)


def eval_plan(args: argparse.Namespace):
    """The run's evaluation during training (settings and sets), checked before any model loads; (None, {})
    when it does not evaluate."""
    from dataset.reading import load_qa_sets
    from evals.robustness import GENERATED
    from trainer.selection import EvalSettings, parse_rule

    strategy = args.eval_strategy or ("steps" if args.eval_steps else "no")
    rule = parse_rule(args.select)
    if strategy == "no":
        if rule is not None:
            raise UserError(f"--select {args.select} picks among evaluated steps: give --eval_steps N or "
                            "--eval_strategy epoch")
        return None, {}
    if strategy == "steps" and args.eval_steps < 1:
        raise UserError("--eval_strategy steps needs --eval_steps N (N >= 1)")
    if deepspeed_zero_stage() == 3:
        raise UserError("evaluation during training under DeepSpeed ZeRO-3: each process holds only a slice of the "
                        "weights; train with ZeRO-2 (accelerate_config.yaml), or evaluate the saved checkpoints")
    if not 0 <= args.utility_floor <= 1:
        raise UserError("--utility_floor must be in [0, 1]")
    if args.eval_batch_size < 1 or args.eval_max_new_tokens < 1:
        raise UserError("--eval_batch_size and --eval_max_new_tokens must be at least 1")
    if rule is not None and rule.metric == "forget_answered":
        raise UserError("--select best:forget_answered: the refusal rate is not scored during training (no "
                        "refusal list); select on forget_prob, forget_em or forget_es")
    needs_answers = {m for m in (rule.metric if rule else None, args.utility_metric) if m in GENERATED}
    if needs_answers and not args.eval_generate:
        raise UserError(f"{', '.join(sorted(needs_answers))} needs greedy answers: add --eval_generate")
    if rule is not None and rule.metric.startswith("auc_") and not args.eval_holdout:
        raise UserError(f"--select {args.select}: the MIA AUCs compare forget with holdout items; give "
                        "--eval_holdout")
    sets = load_qa_sets({"forget": args.eval_forget or args.forget_data_path,
                         "retain": args.eval_retain or args.retain_data_path, "holdout": args.eval_holdout})
    settings = EvalSettings(strategy=strategy, steps=args.eval_steps, generate=args.eval_generate,
                            max_new_tokens=args.eval_max_new_tokens, batch_size=args.eval_batch_size, rule=rule,
                            utility_metric=args.utility_metric, utility_floor=args.utility_floor)
    return settings, sets


def validate(args: argparse.Namespace) -> tuple[Path, object, TrainingData]:
    """Every check that needs no model: fails in seconds, before anything heavy is loaded."""
    template = load_chat_template(args.model_family, args.model_config)
    check_model_folder(args.model_path)
    data = read_data(args)
    for flag in ("max_length", "num_epochs", "bs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    for flag in ("lora_r", "ceu_skip_tokens", "rmu_layer", "save_total_limit"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be at least 0")
    if needs_hidden(args.loss_type):
        layers = num_layers(args, template)
        if layers is not None and args.rmu_layer >= layers:
            raise UserError(f"--rmu_layer {args.rmu_layer}: the model has {layers} decoder layers "
                            f"(0..{layers - 1}); pick one of them")
    if args.eval_tofu:
        from evals.tofu_cli import load_log, set_paths

        if deepspeed_zero_stage() == 3:
            raise UserError("--eval_tofu under DeepSpeed ZeRO-3: each process holds only a slice of the weights, so "
                            "none can generate alone; train with ZeRO-2 (accelerate_config.yaml), or merge the "
                            "adapter and run evaluate_tofu.py (it splits the sets across processes)")

        set_paths(args)
        if args.tofu_retain_result:
            load_log(args.tofu_retain_result, "--tofu_retain_result")
    eval_plan(args)
    if args.report_to != "none":
        import importlib.util

        module = {"tensorboard": "tensorboard", "wandb": "wandb", "swanlab": "swanlab"}.get(args.report_to)
        if module is None:
            raise UserError(f"--report_to must be none, tensorboard, wandb or swanlab, not {args.report_to!r}")
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--report_to {args.report_to}: the {module} package is not installed "
                            f"(pip install {module})")
    if args.max_grad_norm is not None and args.max_grad_norm < 0:
        raise UserError("--max_grad_norm must be at least 0 (0: no clipping)")
    if args.me_floor < 0:
        raise UserError("--me_floor must be at least 0 (0: the exact closed form)")
    if not 0 <= args.warmup_ratio < 1:
        raise UserError("--warmup_ratio must be in [0, 1)")
    if not args.mask and args.loss_type.split("+")[0] in ANSWER_METHODS:
        logger.warning("--loss_type %s with --mask false: the forget loss also covers the question, which the "
                       "model never memorised (the method's papers train on answers; SimNPO, for one, starts "
                       "saturated and does not move). Pass --mask true unless you mean it.", args.loss_type)
    check_load_in_4bit(args)  # before anything heavy: QLoRA's rules and whether bitsandbytes runs here
    if args.max_steps == 0 or args.max_steps < -1:
        raise UserError("--max_steps must be at least 1 (or -1: --num_epochs decides)")
    check_config_file(args)
    warn_demo_data(args, data)
    out_dir = resolve_output_dir(args)
    final = out_dir / final_dir_name(args)
    if final.exists() and not args.overwrite and args.resume_from_checkpoint is None:
        raise UserError(f"{final} already exists; pass --overwrite to replace it "
                        "or choose another --output_dir")
    check_unfinished(args, out_dir, final)
    return out_dir, template, data


def check_config_file(args: argparse.Namespace) -> None:
    """``--config_file`` after the script name (as the original command lines write it) is not read by anything:
    accelerate takes its config only before the script name. Say so, and refuse a file that does not exist."""
    if args.config_file is None:
        return
    if not Path(args.config_file).is_file():
        raise UserError(f"--config_file {args.config_file}: file not found (and after the script name it would not "
                        "be read: `accelerate launch --config_file FILE script.py` reads it)")
    if not is_main_process():  # a warning of every process would print N times
        return
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    logger.warning("--config_file %s after the script name is not read (accelerate reads its config only before the "
                   "script name: accelerate launch --config_file %s %s ...); this run has %d process%s%s",
                   args.config_file, args.config_file, Path(sys.argv[0]).name or "script.py", launched,
                   "" if launched == 1 else "es", ", DeepSpeed" if deepspeed_zero_stage() else "")


def warn_demo_data(args: argparse.Namespace, data: TrainingData) -> None:
    """One line when a run trains on the repository's own demo split because no data path was given."""
    from trainer.arguments import DemoPath

    defaults = [(flag, len(items)) for flag, value, items in
                (("--forget_data_path", args.forget_data_path, data.forget),
                 ("--retain_data_path", args.retain_data_path, data.retain)) if isinstance(value, DemoPath)]
    if defaults and is_main_process():
        logger.warning("no %s given: training on the repository's demo data (%s of fictitious patients); pass %s "
                       "for your own", " / ".join(f for f, _ in defaults),
                       ", ".join(f"{n} {f.split('_')[0].lstrip('-')} items" for f, n in defaults),
                       " and ".join(f"{flag} FILE" for flag, _ in defaults))


def check_unfinished(args: argparse.Namespace, out_dir: Path, final: Path) -> None:
    """A run folder with checkpoints but no final model is an interrupted run: starting it again from scratch
    without being asked would quietly throw its epochs away."""
    from trainer.checkpoints import latest_checkpoint

    if args.resume_from_checkpoint is not None or args.overwrite or final.exists():
        return
    found = latest_checkpoint(out_dir)
    if found is not None:
        raise UserError(f"{out_dir} holds an unfinished run (last checkpoint {found.name}): continue it with "
                        "--resume_from_checkpoint latest, or start again with --overwrite")


def _clear_selection(out_dir: Path, resume: str | None, rule: str = "") -> None:
    """A fresh run starts with no selected step; a resumed one keeps a selection (its record inside
    ``selected/``) made under the same rule up to its checkpoint."""
    import shutil

    from trainer.selection import SELECTED_DIR, SELECTION_FILE, saved_record

    saved = saved_record(out_dir)
    keep = False
    if resume is not None and saved.get("step") is not None:
        from transformers import TrainerState

        last = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json")).global_step
        keep = saved["step"] <= last and (not rule or saved.get("rule") == rule)
    if not keep:
        (out_dir / SELECTION_FILE).unlink(missing_ok=True)
        if (out_dir / SELECTED_DIR).exists():
            shutil.rmtree(out_dir / SELECTED_DIR)


def _clear_checkpoints(out_dir: Path) -> None:
    """A run started from scratch (``--overwrite``) drops an earlier run's checkpoints: ``latest`` must never
    resume a later command from another run's epochs."""
    import shutil

    from trainer.checkpoints import EPOCH_CHECKPOINT_RE

    for child in out_dir.iterdir():
        if EPOCH_CHECKPOINT_RE.match(child.name) and child.is_dir():
            shutil.rmtree(child)
            logger.info("removed %s (an earlier run's checkpoint; starting from scratch)", child)


def _trim_log(path: Path, last_step: int) -> None:
    """On resume, drop log rows written after the checkpoint (they will be logged again)."""
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        write_jsonl(path, [r for r in rows if r.get("step", 0) <= last_step])


def train(args: argparse.Namespace) -> Path:
    """Run one unlearning job; returns the folder of the final adapter."""
    from transformers import TrainerState
    from transformers.trainer_callback import ProgressCallback

    from trainer.callbacks import DatasetEpochCallback, JsonlLogCallback, QuietProgressCallback
    from trainer.checkpoints import EpochCheckpointCallback
    from trainer.unlearn_trainer import UnlearnTrainer

    out_dir, template, data = validate(args)
    during, eval_sets = eval_plan(args)
    resume = _resolve_resume(args, out_dir)
    bf16 = use_bf16(args)
    training_args = build_training_args(args, out_dir, bf16)  # before the model: ZeRO-3 partitions it as it loads
    check_deepspeed(training_args, args)
    if args.max_grad_norm is None and training_args.max_grad_norm > 0:
        logger.info("clipping gradients at %g (1.0 x %d accumulation steps), as the original's DeepSpeed launch did "
                    "(docs/fidelity.md); --max_grad_norm to choose", training_args.max_grad_norm,
                    training_args.gradient_accumulation_steps)
    tokenizer = load_tokenizer(args, template)
    dataset = build_dataset(args, tokenizer, template, data)  # all input errors surface before the model loads
    model = build_model(args, template, bf16, deepspeed=training_args.deepspeed_plugin is not None)
    # full fine-tuning has no adapter to switch off: a frozen copy is the reference, made only when read
    ref_model = copy.deepcopy(model) if args.lora_r == 0 and needs_reference(args.loss_type) else None
    per_round = args.bs * training_args.world_size
    if training_args.world_size > 1 and len(dataset) % per_round:
        logger.warning("%d forget items are not a multiple of --bs x processes (%d): each epoch's last step is "
                       "filled by repeating its first items (every process must step), so it differs from a "
                       "1-process run with the same global batch", len(dataset), per_round)
    trainer = UnlearnTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=ForgetRetainCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        ref_model=ref_model,
        callbacks=[EpochCheckpointCallback(args.save_steps), JsonlLogCallback(out_dir / LOG_FILE),
                   DatasetEpochCallback(dataset)],
    )
    if trainer.pop_callback(ProgressCallback) is not None:  # present unless --disable_tqdm-like settings
        trainer.add_callback(QuietProgressCallback)
    if resume is not None:
        trainer.load_method_state(resume)
    if trainer.is_world_process_zero():
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = out_dir / LOG_FILE
        if resume is None:
            log_path.unlink(missing_ok=True)
            _clear_checkpoints(out_dir)
        else:
            _trim_log(log_path, TrainerState.load_from_json(str(Path(resume) / "trainer_state.json")).global_step)
        record = {**vars(args), "output_dir": str(out_dir), "resolved_from": args.output_dir,
                  "gradient_accumulation_steps": training_args.gradient_accumulation_steps, "bf16": bf16,
                  "max_grad_norm": training_args.max_grad_norm,
                  "world_size": training_args.world_size, "train_items": len(dataset), "resumed_from": resume}
        write_json(out_dir / ARGS_FILE, record)
        _clear_selection(out_dir, resume, str(during.rule) if during and during.rule else "")
    if during is not None:
        from trainer.selection import EvalCallback, eval_rows

        trainer.accelerator.wait_for_everyone()  # the main process has trimmed the log before any reads it
        rows = []
        if resume is not None and (out_dir / LOG_FILE).is_file():
            rows = eval_rows([json.loads(x) for x in (out_dir / LOG_FILE).read_text(encoding="utf-8").splitlines()
                              if x.strip()])
        trainer.add_callback(EvalCallback(trainer, tokenizer, template, eval_sets, out_dir, during, rows))
    logger.info("training %s on %d forget items for %s -> %s", args.loss_type, len(dataset),
                f"{args.max_steps} steps (--max_steps)" if args.max_steps > 0
                else f"{args.num_epochs} epoch{'' if args.num_epochs == 1 else 's'}", out_dir)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        from trainer.checkpoints import latest_checkpoint

        found = latest_checkpoint(out_dir)
        raise KeyboardInterrupt(
            f"the last complete checkpoint is {found}; run the same command with --resume_from_checkpoint latest "
            "to continue from it" if found else
            "no checkpoint was written yet (one is written every --save_steps epochs)") from None
    final = save_final(trainer, out_dir, final_dir_name(args))
    if args.eval_tofu:
        evaluate_on_tofu(args, trainer, tokenizer, template, out_dir)
    close_process_group()
    return final


def evaluate_on_tofu(args: argparse.Namespace, trainer, tokenizer, template, out_dir: Path) -> None:
    """``--eval_tofu``: TOFU logs and summary of the trained model in ``<run>/tofu_eval``, every process
    evaluating its share of the batches (:mod:`evals.shard`), the main process writing."""
    from evals.shard import Shard
    from evals.tofu_cli import format_table, run_evaluation, set_paths

    shard = Shard(trainer.accelerator.process_index, trainer.accelerator.num_processes)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    stats = run_evaluation(model, tokenizer, template, set_paths(args), out_dir / "tofu_eval",
                           args.tofu_retain_result, args.ds_size, args.tofu_batch_size, shard,
                           args.tofu_generation_batch_size)
    if shard.is_main:
        logger.info("TOFU evaluation (%s):\n%s", out_dir / "tofu_eval", format_table(stats))


def build_parser(method: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of a forget script, with that script's defaults (``SCRIPT_DEFAULTS[method]``)."""
    from trainer.arguments import add_unlearn_args
    from utils.cli import ScriptParser

    parser = ScriptParser(description)
    add_unlearn_args(parser, loss_choices=sorted(LOSSES), **SCRIPT_DEFAULTS[method])
    return parser


def main_for(method: str, argv: list[str] | None, description: str) -> Path:
    """Parse a forget script's arguments (defaults by ``method``) and train."""
    from utils.cli import setup_logging

    args = build_parser(method, description).parse_args(argv)
    if not Path(args.idk_data_path).is_absolute() and not Path(args.idk_data_path).exists():
        candidate = PROJECT_ROOT / args.idk_data_path
        if candidate.exists():
            args.idk_data_path = str(candidate)
    setup_logging()
    return train(args)
