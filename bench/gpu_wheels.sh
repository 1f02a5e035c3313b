#!/usr/bin/env bash
# Wheels the GPU check needs that the lent GPU machine's image lacks (it reaches no package index): DeepSpeed
# (built here from its source distribution; pure Python) and its pydantic/hjson requirements, for Python 3.12
# x86-64, into .whl/ (ignored by git; the device tool carries it: carry [".whl"]). Run here, before the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
ls -la .whl
