"""The run's final folder: saved to a temporary folder, checked for weights, then swapped in."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

FINAL_DIR = "final_lora_model"
FULL_DIR = "final_model"  # --lora_r 0: the whole model, nothing to merge


def save_final(trainer, out_dir: Path, name: str = FINAL_DIR, extra_json: dict | None = None) -> Path:
    """Save adapter (or whole model) + tokenizer to a temporary folder, then swap it in as ``name``
    (:func:`utils.files.replace_folder`: a kill leaves the previous final folder or the new one, never neither).
    An adapter saved without weights (ZeRO-3 that did not gather them) is an error, not a finished folder.
    ``extra_json``: files (name -> object) written into the folder before it is swapped in. An adapter also gets
    its base model's fingerprint (:data:`utils.fingerprint.FINGERPRINT_FILE`), which merge.py checks its
    ``--base_model`` against wherever it runs."""
    import shutil

    from utils.files import recover_folder, replace_folder, write_json
    from utils.fingerprint import record_base_fingerprint

    final, tmp = out_dir / name, out_dir / f".{name}.tmp"
    if trainer.is_world_process_zero():
        recover_folder(final)
        if tmp.exists():
            shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the arguments are in run_args.json
        empty = empty_weights(tmp)
        if empty:
            raise RuntimeError(f"the saved weights in {tmp} are empty ({', '.join(empty[:3])}, ...): nothing was "
                               "gathered from the processes; the final folder was not written")
        if (tmp / "adapter_config.json").is_file():
            record_base_fingerprint(tmp)  # in the folder before it is swapped in: adapter and record change together
        for file_name, obj in (extra_json or {}).items():
            write_json(tmp / file_name, obj)
        replace_folder(tmp, final)
        logger.info("saved the %s to %s", "model" if name == FULL_DIR else "adapter", final)
    trainer.accelerator.wait_for_everyone()
    return final


def empty_weights(folder: Path) -> list[str]:
    """Names of the weight tensors saved in ``folder`` that hold no value (and ``[]`` when every one has values);
    a folder with no weight file at all counts as empty."""
    from safetensors import safe_open

    empty, count = [], 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                count += 1
                if 0 in fh.get_slice(key).get_shape():
                    empty.append(key)
    return empty if count else ["(no weight tensor at all)"]
