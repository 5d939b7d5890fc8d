#!/usr/bin/env bash
# GPU benchmarks on a bare GPU box: Python with torch, timm, pyarrow and pillow only (no Ray).
# Usage: bench/gpu.sh   (IMAGES=8192 by default; PY=python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" bench/gpu_embed.py --images "${IMAGES:-8192}"
"$PY" bench/gpu_train.py --n-train "${TRAIN_ROWS:-131072}"
