#!/usr/bin/env bash
# The demo: every stage of the atlas on a small generated data set, on this machine's CPU.
# Usage: scripts/demo.sh [DIR]   (default: demo/). Safe to rerun: finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-demo}
PY=${PY:-.venv/bin/python}
GS=("$PY" -m galaxysae)

mkdir -p "$DIR"
echo "== synth: generated gz_euclid-shaped data in $DIR/gz_euclid"
"${GS[@]}" synth --config configs/demo/synth.toml --out "$DIR/gz_euclid"

echo "== hub: offline Hugging Face cache in $DIR/hf (STAND-IN random encoder + the generated data)"
"${GS[@]}" hub --hf-home "$DIR/hf" --dataset "$DIR/gz_euclid"
HF_HOME="$(cd "$DIR/hf" && pwd)"
export HF_HOME HF_HUB_OFFLINE=1
