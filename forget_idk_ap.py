"""Targeted unlearning with IDK+AP: learn "I don't know" on forget questions + answer preservation on retain.

    accelerate launch --config_file accelerate_config.yaml forget_idk_ap.py --model_path MODEL \
        --model_family qwen2.5-8b --num_epochs 5 --bs 1 --max_length 288 --loss_type IDK+AP \
        --forget_data_path ./data/forget/forget.jsonl --retain_data_path ./data/retain/retain.jsonl \
        --idk_data_path ./data/idontknow.jsonl --lr 3e-5 --forget_coeff 0.5 --regularization_coeff 1.0

On one device, `python forget_idk_ap.py ...` with the same arguments. The adapter is saved to
`adapter/<run name>/final_lora_model/`.
"""

from __future__ import annotations

from pathlib import Path

from trainer.recipe import main_for
from utils.cli import run_cli


def main(argv: list[str] | None = None) -> Path:
    return main_for("idk_ap", argv, __doc__)


if __name__ == "__main__":
    run_cli(main)
