"""Untargeted unlearning with ME+GD: maximum entropy on forget answers + next-token loss on retain.

    accelerate launch --config_file accelerate_config.yaml forget_me_gd.py --model_path MODEL \
        --model_family qwen2.5-8b --num_epochs 5 --bs 1 --max_length 400 --loss_type ME+GD \
        --forget_data_path ./data/forget/forget.jsonl --retain_data_path ./data/retain/retain.jsonl \
        --mask false --lr 3e-5 --lora_r 16 --lora_alpha 32 --lora_dropout 0.05 \
        --forget_coeff 1.0 --regularization_coeff 1.0

On one device, `python forget_me_gd.py ...` with the same arguments. The adapter is saved to
`adapter/<run name>/final_lora_model/`.
"""

from __future__ import annotations

from pathlib import Path

from trainer.recipe import main_for
from utils.cli import run_cli


def main(argv: list[str] | None = None) -> Path:
    return main_for("me_gd", argv, __doc__)


if __name__ == "__main__":
    run_cli(main)
