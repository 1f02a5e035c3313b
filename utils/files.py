"""Files a run writes, written whole or not at all: atomic writes (temp file + rename), folders swapped in one step
(``renameat2``), the checks that an input folder is complete and an output free."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from utils.errors import UserError

logger = logging.getLogger(__name__)


def check_model_folder(path: str | os.PathLike, flag: str = "--model_path") -> Path:
    """A local transformers model folder (with config.json), or a clear error."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{flag} {path}: not a model folder (no config.json there)")
    return path


def check_adapter_folder(path: str | os.PathLike, flag: str = "--adapter") -> Path:
    """A PEFT adapter folder (with adapter_config.json), or a clear error."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{flag} {path}: not a PEFT adapter folder (no adapter_config.json there)")
    return path


def check_output_free(path: str | os.PathLike, overwrite: bool, flag: str = "--output") -> Path:
    """Refuse to write into an existing non-empty folder (or over a file) unless ``overwrite``."""
    path = Path(path)
    occupied = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if occupied and not overwrite:
        raise UserError(f"{flag} {path} already exists and is not empty; pass --overwrite to replace it")
    return path


# --------------------------------------------------------------------------- atomic writes


RENAME_EXCHANGE = 2  # linux/fs.h: renameat2 swaps the two paths in one step
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or file system cannot (then :func:`replace_folder` falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _old_copy(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.old")


def recover_folder(dest: str | os.PathLike) -> None:
    """Undo a kill inside :func:`replace_folder`'s two-rename fallback: when ``dest`` is missing and its previous
    version still lies aside (``.<name>.old``), put it back. Every writer calls it before it writes ``dest``."""
    dest = Path(dest)
    old = _old_copy(dest)
    if not dest.exists() and old.is_dir():
        old.rename(dest)
        logger.warning("%s: restored the previous version (a replacement was interrupted)", dest)


def replace_folder(new: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Put the complete folder ``new`` at ``dest`` (on the same file system), replacing what is there.

    A kill at any moment leaves ``dest`` whole, old or new: the two are swapped in one step where the system
    can (``renameat2``), else the old one is renamed aside before the new one is renamed in, and
    :func:`recover_folder` puts it back when the second rename never happened. Only then is the old one removed.
    """
    new, dest = Path(new), Path(dest)
    if not dest.exists():
        os.replace(new, dest)
        return
    if _exchange(new, dest):
        _remove(new)  # now the old version
        return
    old = _old_copy(dest)
    _remove(old)
    dest.rename(old)
    new.rename(dest)
    _remove(old)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (file or folder).

    Nothing appears at ``path`` unless the block finishes, so an interrupted write never leaves a
    half-written file. An existing folder at ``path`` is replaced only after the new one is complete, and in
    one step (:func:`replace_folder`): a kill never leaves only the temporary copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / "out"
    try:
        yield target
        if path.is_dir() and target.is_dir():
            replace_folder(target, path)
        else:
            os.replace(target, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Write rows as JSON lines (UTF-8, no ASCII escaping), atomically."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write one JSON document, atomically."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=indent)
        fh.write("\n")


# --------------------------------------------------------------------------- argparse helpers
