#!/usr/bin/env bash
# GPU benchmarks on a bare GPU box: Python with torch, timm, pyarrow and pillow only (no Ray, no
# network, no downloads: the data is generated; simplejpeg, the pipeline's strict JPEG decoder,
# is used when installed, else PIL decodes). About 5 minutes on one H100/H200-class GPU.
# Prints: original-style embed loop img/s, encoder-only img/s (fp32 vs bf16, channels_last),
# decode / encode / pipeline img/s with N decode CPUs, SAE training samples/s (ours vs the
# original loops) with a per-part timing table, GPU memory, host syncs in a training step; ends
# with `target ...` lines.
# Usage: bench/gpu.sh [--smoke]   (--smoke: tiny sizes, runs on a CPU in seconds; used by tests)
#        env: PY=python3 IMAGES=8192 TRAIN_ROWS=131072 DECODERS=<cpus-2>
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# A lent GPU is scarce: a bench that fails must not cost the other one its figures. Each runs
# whatever the other did; the script exits non-zero if either failed.
failed=()
bench() {
  local rc=0
  "$PY" "$@" || rc=$?
  if ((rc != 0)); then
    echo "bench/gpu.sh: $1 failed (exit $rc)" >&2
    failed+=("$1")
  fi
}
if [[ "${1:-}" == "--smoke" ]]; then
  bench bench/gpu_embed.py --smoke
  bench bench/gpu_train.py --smoke
else
  decoders=()
  if [[ -n "${DECODERS:-}" ]]; then decoders=(--decoders "$DECODERS"); fi
  # ${a[@]+...}: an empty array under set -u is "unbound" in bash < 4.4 (RHEL/CentOS 7)
  bench bench/gpu_embed.py --images "${IMAGES:-8192}" ${decoders[@]+"${decoders[@]}"}
  bench bench/gpu_train.py --n-train "${TRAIN_ROWS:-131072}"
fi
if ((${#failed[@]})); then
  echo "bench/gpu.sh: failed: ${failed[*]}" >&2
  exit 1
fi
