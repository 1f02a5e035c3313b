"""The training scripts' command line: names, meanings and defaults as the original scripts', one place for both."""

from __future__ import annotations

import argparse

from evals.tofu_cli import add_tofu_set_args
from utils.cli import add_model_args, bool_arg


class DemoPath(str):
    """A default data path: equal to the original's string, but a run can tell that nobody gave it (a path given
    on the command line or in --config is a plain ``str``, whatever it spells)."""


# the repository's demo split, the original scripts' default paths (a run that trains on them says so)
DEFAULT_FORGET = DemoPath("./data/forget/forget.jsonl")
DEFAULT_RETAIN = DemoPath("./data/retain/retain.jsonl")


def add_unlearn_args(
    parser: argparse.ArgumentParser, *, loss_type: str, max_length: int, forget_coeff: float, loss_choices: list[str],
    num_epochs: int = 5, save_steps: int = 1,
    output_dir: str = "${save_root}/${loss_type}_epoch${num_epochs}_${lr}_mask${mask}_${forget_coeff}",
) -> None:
    """The training scripts' arguments (names, meanings and defaults as the original scripts'), per-script defaults."""
    add_model_args(parser, model_path=None, family="qwen2.5-8b")
    parser.add_argument("--config_file", default=None,
                        help="accepted so the original command lines keep working, but not read (a warning says so; "
                             "a missing file is an error): accelerate reads its config only before the script name, "
                             "`accelerate launch --config_file FILE script.py`")

    data = parser.add_argument_group("data")
    data.add_argument("--forget_data_path", default=DEFAULT_FORGET, help="JSONL of items to forget")
    data.add_argument("--retain_data_path", default=DEFAULT_RETAIN, help="JSONL of items to keep")
    data.add_argument("--idk_data_path", default="./data/idontknow.jsonl",
                      help="refusal sentences, one a line (losses with IDK/DPO/AP parts)")
    data.add_argument("--max_length", type=int, default=max_length, help="token limit of each formatted sample")
    bool_arg(data, "--mask", False, "mask the forget question's labels (retain questions are always masked)")
    bool_arg(data, "--pad_to_max_length", False,
             "reproduce the original scripts: pad every sample to --max_length with EOS, and with --mask false "
             "use the padded ids (EOS padding included) as forget labels")

    loss = parser.add_argument_group("objective")
    loss.add_argument("--loss_type", default=loss_type, choices=loss_choices, metavar="LOSS_TYPE",
                      help=f"forget(+retain) objective, one of: {', '.join(loss_choices)} (docs/methods.md)")
    loss.add_argument("--forget_coeff", type=float, default=forget_coeff, help="weight of the forget loss")
    loss.add_argument("--regularization_coeff", type=float, default=1.0, help="weight of the retain loss")
    loss.add_argument("--me_floor", type=float, default=1e-12,
                      help="ME: the floor inside its log, KL(uniform || softmax + floor), as the competition's code; "
                           "0: the exact closed form (docs/fidelity.md)")
    loss.add_argument("--kl_reduction", default="tokens", choices=["tokens", "batchmean"],
                      help="KL retain term: mean over answer tokens (invariant to padding and to how a step is split), "
                           "or batchmean over every position of the batch, padding included (open-unlearning's)")
    loss.add_argument("--beta", type=float, default=0.1, help="inverse temperature of AP, NPO and DPO")
    loss.add_argument("--simnpo_beta", type=float, default=4.5, help="SimNPO: inverse temperature")
    loss.add_argument("--simnpo_delta", type=float, default=0.0,
                      help="SimNPO: margin subtracted from the mean answer NLL")
    loss.add_argument("--undial_beta", type=float, default=10.0,
                      help="UNDIAL: how far the true token's reference logit is lowered")
    loss.add_argument("--wga_beta", type=float, default=1.0, help="WGA: exponent of the token weight p**beta")
    loss.add_argument("--satimp_beta1", type=float, default=5.0, help="SatImp: exponent of p in the token weight")
    loss.add_argument("--satimp_beta2", type=float, default=1.0, help="SatImp: exponent of (1 - p)")
    loss.add_argument("--ceu_skip_tokens", type=int, default=1,
                      help="CE-U: each item's first answer tokens left out of the loss")
    loss.add_argument("--rmu_layer", type=int, default=7,
                      help="RMU: decoder layer whose output is steered (0-based); LoRA (or, with --lora_r 0, "
                           "training) is limited to this layer and the two below it")
    loss.add_argument("--rmu_steering_coeff", type=float, default=6.5, help="RMU: length c of the target c*u")
    loss.add_argument("--pdu_epsilon", type=float, default=None,
                      help="PDU: bound on the retain loss; default: the first step's retain loss")
    loss.add_argument("--pdu_dual_step_size", type=float, default=1.0,
                      help="PDU: step of the dual ascent on the retain weight (which starts at "
                           "--regularization_coeff)")
    loss.add_argument("--retain_sampling", default="fixed", choices=["fixed", "random"],
                      help="fixed: each forget item always meets the same retain item (the original scripts); "
                           "random: a fresh seeded draw every epoch, so every retain item gets used")

    train = parser.add_argument_group("training")
    train.add_argument("--num_epochs", type=int, default=num_epochs, help="passes over the forget set")
    train.add_argument("--max_steps", type=int, default=-1,
                       help="stop after this many optimizer steps (overrides --num_epochs; -1: --num_epochs decides)")
    train.add_argument("--bs", type=int, default=1, help="per-device batch size (forget items per step)")
    train.add_argument("--gradient_accumulation_steps", type=int, default=None,
                       help="default: accelerate's config value when launched by it, else 1")
    train.add_argument("--loss_reduction", default="global", choices=["global", "micro_batch"],
                       help="global: each term is a mean over all items of the optimizer step (its tokens or rows), "
                            "the same on 1 process, N processes or N accumulation micro-batches; micro_batch: the "
                            "mean of per-micro-batch means, as the original (results then depend on the split)")
    train.add_argument("--lr", type=float, default=3e-5, help="peak learning rate")
    train.add_argument("--wd", type=float, default=0.01, help="weight decay")
    train.add_argument("--lr_scheduler_type", default="cosine",
                       choices=["cosine", "linear", "constant", "constant_with_warmup"], help="learning-rate schedule")
    train.add_argument("--warmup_ratio", type=float, default=0.05, help="fraction of optimizer steps for warm-up")
    train.add_argument("--max_grad_norm", type=float, default=None,
                       help="clip gradients to this norm; 0 = no clipping. Default: as the original's launch did, "
                            "none with plain python, and under DeepSpeed 1.0 x the accumulation steps (the original's "
                            "DeepSpeed clipped its gradient at 1.0 after the loss had been divided by the accumulation "
                            "steps twice: docs/fidelity.md)")
    train.add_argument("--seed", type=int, default=1001, help="seed for LoRA initialisation and data order")
    train.add_argument("--logging_steps", type=int, default=1, help="log every N optimizer steps")
    train.add_argument("--save_steps", type=int, default=save_steps,
                       help="save a resumable checkpoint every N epochs (epochs, as the original counted them; "
                            "the original's defaults 10 / 100 wrote none in a default run; 0: never)")
    train.add_argument("--save_total_limit", type=int, default=1,
                       help="keep only the newest N checkpoint-epoch-* folders (each is resumable; with --lora_r 0 "
                            "each holds the whole model and its optimizer state); 0 keeps them all")
    bool_arg(train, "--bf16", None, "bfloat16 (default: on when a CUDA GPU supports it)")
    bool_arg(train, "--gradient_checkpointing", False, "recompute activations to save memory")
    bool_arg(train, "--group_by_length", False, "batch items of similar length together (less padding, bs > 1)")
    bool_arg(train, "--fused_head_loss", True, "per-token losses (NLL, ME) straight from the output head's input in "
                                               "chunks, never building the B x T x vocabulary logits (less memory); "
                                               "false: the plain logits path")
    train.add_argument("--report_to", default="none", help="none, tensorboard, wandb or swanlab (when installed)")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_r", type=int, default=16,
                      help="LoRA rank; 0 trains every weight (full fine-tuning, saved as a whole model)")
    lora.add_argument("--lora_alpha", type=int, default=32, help="LoRA scaling alpha")
    lora.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout")
    lora.add_argument("--lora_target_modules", nargs="+", default=["all-linear"],
                      help="module names to adapt (default: every linear layer but the output head)")
    bool_arg(lora, "--load_in_4bit", False,
             "QLoRA: load the frozen base with 4-bit NF4 weights (bitsandbytes) and train the LoRA adapter on it; "
             "needs --lora_r >= 1, no DeepSpeed")

    out = parser.add_argument_group("output")
    out.add_argument("--save_root", default="adapter", help="folder that holds run folders")
    out.add_argument("--output_dir", default=output_dir,
                     help="run folder (a whole path); ${name} is filled from the arguments")
    out.add_argument("--resume_from_checkpoint", default=None,
                     help="a checkpoint folder, or 'latest' for the newest checkpoint-epoch-N of the run")
    bool_arg(out, "--overwrite", False, "replace a finished run folder's final adapter")

    during = parser.add_argument_group("evaluation during training and the stopping rule (docs/evaluation.md)")
    during.add_argument("--eval_strategy", default=None, choices=["no", "steps", "epoch"],
                        help="score the model on the evaluation sets before the first step and then every "
                             "--eval_steps steps or at each epoch's end (default: steps when --eval_steps is "
                             "given, else no)")
    during.add_argument("--eval_steps", type=int, default=0, help="evaluate every N optimizer steps")
    during.add_argument("--eval_forget", default=None, help="evaluation forget set (default: --forget_data_path)")
    during.add_argument("--eval_retain", default=None, help="evaluation retain set (default: --retain_data_path)")
    during.add_argument("--eval_holdout", default=None,
                        help="items like the forget set, never trained on: MIA AUCs of forget vs holdout")
    bool_arg(during, "--eval_generate", False, "also greedy answers (ROUGE-L): slower than the scoring passes")
    during.add_argument("--eval_max_new_tokens", type=int, default=32, help="--eval_generate: answer length")
    during.add_argument("--eval_batch_size", type=int, default=8, help="evaluation batch size")
    during.add_argument("--select", default="none",
                        help="the rule that picks the step saved to <run>/selected/: best:<metric> or "
                             "first_below:<metric>=<value> (e.g. a retain-only model's value: MUSE's rule); "
                             "metrics: forget_prob, forget_em, forget_es, auc_loss, ..., retain_prob")
    during.add_argument("--utility_metric", default="retain_prob", choices=["retain_prob", "retain_rouge_f"],
                        help="--select: the utility the floor holds")
    during.add_argument("--utility_floor", type=float, default=0.8,
                        help="--select: only steps keeping at least this share of the starting model's utility "
                             "(0.8: OpenUnlearning's 20 %% filter; 0: no floor)")

    bool_arg(parser, "--eval_tofu", False, "after training, evaluate on TOFU (the four --*_path sets below) and "
                                           "write the summary to <run>/tofu_eval/")
    parser.add_argument("--tofu_retain_result", default=None,
                        help="--eval_tofu: a retain-only model's eval_log_aggregated.json, for forget quality")
    add_tofu_set_args(parser)
