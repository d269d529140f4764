#!/usr/bin/env bash
# Reproduce the README's measurements (long: tens of minutes on 2 cores; Qwen needs ~4 GB of disk).
#   bash scripts/reproduce.sh [smollm2|qwen|all]
set -euo pipefail
WHAT=${1:-all}
HOME_DIR=${FLASHLLM_HOME:-$HOME/.cache/flashllm}
OUT=${OUT:-results}
mkdir -p "$OUT"

bundle() {  # convert once, train predictors once
  local model=$1 bundle=$HOME_DIR/bundles/$1; shift
  [ -f "$bundle/manifest.json" ] || { mkdir -p "$(dirname "$bundle")"; flashllm convert "$model" "$bundle"; }
  [ -f "$bundle/predictors.json" ] || flashllm train-predictor "$bundle" "$@"
  echo "$bundle"
}

if [ "$WHAT" = smollm2 ] || [ "$WHAT" = all ]; then
  B=$(bundle smollm2-135m --tokens 8192 --eval-tokens 2048 | tail -1)
  flashllm bench io "$HOME_DIR"
  flashllm bench "$B" --dram-budget 70% --prompts 2 --tokens 64 --json "$OUT/bench_smollm2.json"
  python scripts/policy_replay.py "$B" --budget 60% --mode oracle --prompts 1 --tokens 64 | tee "$OUT/policies_smollm2.txt"
  python scripts/budget_check.py "$B" --budget 50% --tokens 16 | tee "$OUT/budget_smollm2.txt"
  flashllm bench "$B" --sweep --plot "$OUT/sweep_smollm2.png" --prompts 1 --prompt-tokens 64 --tokens 32 \
    --strategies naive,hybrid,page-cache,all,int4-gate-up --json "$OUT/sweep_smollm2.json"
fi
if [ "$WHAT" = qwen ] || [ "$WHAT" = all ]; then
  B=$(bundle qwen2.5-coder-1.5b --sparsity 0.5 --group 32 --tokens 6144 --eval-tokens 2048 | tail -1)
  flashllm bench "$B" --dram-budget 50% --prompts 2 --prompt-tokens 64 --tokens 24 --json "$OUT/bench_qwen.json"
  SPLIT=$(python -c "from flashllm.measure.bench import split_bundle; from pathlib import Path; print(split_bundle(Path('$B')))")
  flashllm perplexity "$SPLIT" builtin:heldout --mode predictor --dram-budget 50% --gate-up int4 --max-tokens 2048 \
    --json > "$OUT/perplexity_qwen_int4_gate_up.json"
  flashllm bench "$B" --sweep --plot "$OUT/sweep_qwen.png" --prompts 1 --prompt-tokens 32 --tokens 8 \
    --strategies naive,page-cache,all,int4-gate-up --json "$OUT/sweep_qwen.json"
  python scripts/budget_check.py "$B" --budget 50% --tokens 8 | tee "$OUT/budget_qwen.txt"
  python scripts/llamacpp_compare.py --bundle "$B" | tee "$OUT/llamacpp_qwen.txt"
fi
