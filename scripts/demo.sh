#!/usr/bin/env bash
# The demo: every stage of the atlas on a small generated data set, on this machine's CPU.
#   synth -> hub -> embed -> train (TopK, Matryoshka) -> pca -> compare -> render -> atlas
# Usage: scripts/demo.sh [DIR]   (default: demo/). Safe to rerun: finished work is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-demo}
PY=${PY:-.venv/bin/python}
GS=("$PY" -m galaxysae)
start=$SECONDS
stage() { printf '\n== [%4ss] %s\n' "$((SECONDS - start))" "$*"; }

mkdir -p "$DIR"
stage "synth: generated gz_euclid-shaped data in $DIR/gz_euclid"
"${GS[@]}" synth --config configs/demo/synth.toml --out "$DIR/gz_euclid"

stage "hub: offline Hugging Face cache in $DIR/hf (STAND-IN random encoder + the generated data)"
"${GS[@]}" hub --hf-home "$DIR/hf" --dataset "$DIR/gz_euclid"
HF_HOME="$(cd "$DIR/hf" && pwd)"
export HF_HOME HF_HUB_OFFLINE=1

stage "embed: Zoobot (stand-in) embeddings with Ray Data in $DIR/embeddings"
"${GS[@]}" embed --config configs/demo/embed.toml --output "$DIR/embeddings"

stage "train: a TopK SAE in $DIR/sae/topk"
"${GS[@]}" train --config configs/demo/train_topk.toml --embeddings "$DIR/embeddings" --output "$DIR/sae/topk"
stage "train: a Matryoshka (BatchTopK) SAE in $DIR/sae/matryoshka"
"${GS[@]}" train --config configs/demo/train_matryoshka.toml --embeddings "$DIR/embeddings" --output "$DIR/sae/matryoshka"

stage "pca: the PCA baseline in $DIR/pca"
"${GS[@]}" pca --config configs/demo/pca.toml --embeddings "$DIR/embeddings" --output "$DIR/pca"

DICTS="$DIR/sae/topk,$DIR/sae/matryoshka,$DIR/pca"
stage "compare: Galaxy Zoo label alignment in $DIR/results/compare"
"${GS[@]}" compare --config configs/demo/compare.toml --dictionaries "$DICTS" --embeddings "$DIR/embeddings" \
  --dataset "$DIR/gz_euclid" --results "$DIR/results"

stage "render: grids of each answer's best feature and the most frequent ones in $DIR/results"
"${GS[@]}" render --config configs/demo/render.toml --dictionaries "$DICTS" --embeddings "$DIR/embeddings" \
  --dataset "$DIR/gz_euclid" --results "$DIR/results"

stage "atlas: the static HTML site in $DIR/atlas"
"${GS[@]}" atlas --config configs/demo/atlas.toml --results "$DIR/results" --output "$DIR/atlas"

stage "done"
echo "Open the atlas: $(cd "$DIR/atlas" && pwd)/index.html"
