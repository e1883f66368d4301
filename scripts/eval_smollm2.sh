#!/usr/bin/env bash
# Reproduce the README quality table on SmolLM2-135M-Instruct: calibrate KV-Dict with
# recipes/kvdict.yaml (unless a calibration folder is given), then run `kvsurgery eval`
# (KV-Dict, full cache, sink+window at KV-Dict's measured memory, int4/int2 quantized
# caches) on perplexity, passkey and needle at 2k, 4k and 8k tokens.
#
#   bash scripts/eval_smollm2.sh                          # calibrate, then evaluate
#   bash scripts/eval_smollm2.sh runs/demo/calibration    # evaluate an existing calibration
#   CONTEXT=2k bash scripts/eval_smollm2.sh               # fewer contexts
#   DTYPE=float32 OUT=runs/eval-fp32 bash scripts/eval_smollm2.sh   # model dtype, folder
#   bash scripts/eval_smollm2.sh "" --trials 3            # extra flags go to `kvsurgery eval`
#
# Both steps resume: rerunning the same command continues where it stopped. Results:
# $OUT/eval/results.md (the table), results.json (every number with its settings).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/eval-smollm2}
CONTEXT=${CONTEXT:-2k,4k,8k}
# bf16 on the CPU: decoding reads half the weight bytes of fp32 (about 3x faster here), and
# the full cache is then the fp16-sized reference the "% of fp16" column compares with.
DTYPE=${DTYPE:-bfloat16}
CAL=${1:-}
shift || true

# The baselines extra brings the quantized-cache backends; a baseline whose backend does
# not run here is reported as skipped, with the reason.
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[baselines]"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false PYTHONSAFEPATH=1

if [ -z "$CAL" ]; then
  CAL="$OUT/calibration"
  if ! "$PY" -c 'import json, sys; sys.exit("kvdict" not in json.load(open(sys.argv[1])).get("methods", {}))' \
    "$CAL/manifest.json" 2>/dev/null; then
    "$PY" -m kvsurgery.cli calibrate --model smollm2-135m --recipe recipes/kvdict.yaml --out "$CAL"
  fi
fi

"$PY" -m kvsurgery.cli eval --calibration "$CAL" --context "$CONTEXT" --dtype "$DTYPE" --out "$OUT/eval" "$@"
