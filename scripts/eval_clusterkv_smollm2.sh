#!/usr/bin/env bash
# ClusterKV quality on SmolLM2-135M-Instruct at budgets 256/512/1024 tokens per step, against
# the full cache and a sink+window cache of the same budget (4 sinks + budget-4 recent):
# continuation perplexity after a 4k prefix (128 tokens fed one at a time through the cache)
# on three texts (the eval text first), and passkey and needle retrieval at 2k/4k. One
# capture (2 x 4096 tokens, keys and queries) is shared by the three calibrations. Every
# step resumes when rerun.
#
#   bash scripts/eval_clusterkv_smollm2.sh            # everything (CPU: about 45 minutes)
#   OUT=runs/ckv BUDGETS="512" bash scripts/eval_clusterkv_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/clusterkv-smollm2}
BUDGETS=${BUDGETS:-256 512 1024}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
recipe() { if [ "$1" = 512 ]; then echo recipes/clusterkv.yaml; else echo "recipes/clusterkv-$1.yaml"; fi; }
first=""
for B in $BUDGETS; do
  if [ -n "$first" ] && [ ! -d "$OUT/cal$B/capture" ]; then  # same windows: reuse the capture
    mkdir -p "$OUT/cal$B" && cp -r "$OUT/cal$first/capture" "$OUT/cal$B/"
  fi
  "$PY" -m kvsurgery.cli calibrate --model smollm2-135m --recipe "$(recipe "$B")" --out "$OUT/cal$B"
  first=${first:-$B}
done
for B in $BUDGETS; do
  methods="clusterkv,sink_window:$((B - 4))"
  [ "$B" = "$first" ] && methods="$methods,full"
  "$PY" -m kvsurgery.cli eval --calibration "$OUT/cal$B" --methods "$methods" --tasks ppl \
    --context 4k --ppl-texts 3 --out "$OUT/eval${B}_ppl" --no-progress
  "$PY" -m kvsurgery.cli eval --calibration "$OUT/cal$B" --methods "$methods" --tasks passkey,needle \
    --context "${PASSKEY_CONTEXT:-2k,4k}" --out "$OUT/eval${B}_passkey" --no-progress
done
for f in "$OUT"/eval*/results.md; do echo "== $f"; cat "$f"; done
