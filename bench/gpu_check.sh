#!/usr/bin/env bash
# The GPU check (tests/gpu/test_gpu_path.py) on a lent GPU machine, under 8 minutes on one GPU:
#   bash bench/gpu_wheels.sh          # here, once: the wheels the machine lacks, into .whl/
#   device run: bash bench/gpu_check.sh   (carry [".whl"], timeout_s 540)
# Random models built from a config (Qwen2.5-0.5B's shape and vocabulary; a Llama shape with a BOS-adding
# tokenizer); {LoRA bf16, full FT, ZeRO-2, ZeRO-3} x {ME+GD, NPO+KL}; vLLM vs transformers greedy answers where vLLM
# is installed; the step's MFU. The log goes to $OUT/gpu_check.log (the device tool brings it back).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu_check.log"
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" 2>&1 | tee -a "$out/gpu_check.log"
timeout 480 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider -s -rA 2>&1 | tee -a "$out/gpu_check.log"
