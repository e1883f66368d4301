#!/usr/bin/env bash
# The whole GPU benchmark in one command, on a CUDA machine without network access:
#   decode attention per layer of every method vs dense SDPA at the Llama-3-8B attention
#   shape (32 query / 8 KV heads, d = 128, bf16), contexts 4k-128k, batch 1 and 8 (CUDA
#   events and CUDA-graph replays, medians); KV bytes per token; prefill-side costs (OMP,
#   k-means) vs prefill attention; end-to-end generate tokens/s when MODEL is set.
#
# Usage:  scripts/bench_gpu.sh [more `kvsurgery bench` options, e.g. --contexts 8k,32k]
# Env:    OUT    output folder (default runs/bench-gpu): bench.json, bench.png (when
#                matplotlib is installed), table.txt, bench.log, env.txt, and
#                clusterkv-estimate-rest, clusterkv-spread-ranking and
#                clusterkv-estimate-rest-spread-ranking-tokens-per-cluster8 .{json,txt}
#                (ClusterKV's options), omp.txt (scripts/bench_omp_gpu.py)
#         MODEL  local model folder / cached alias for the generate run (default: skipped)
#         PYTHON interpreter (default python); torch, transformers and triton must be there.
# Needs nothing from the network: the repo is installed in place with --no-deps, or, when
# pip cannot do that, put on PYTHONPATH as a package tree built in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT="${OUT:-runs/bench-gpu}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # the interpreter would time Python, not the GPU

here() {  # does `import kvsurgery.kernels` resolve to this checkout?
  "$PY" - "$REPO" <<'EOF' 2>/dev/null
import os, sys
import kvsurgery.kernels as k
sys.exit(0 if os.path.realpath(k.__file__).startswith(os.path.realpath(sys.argv[1])) else 1)
EOF
}
if ! here; then
  if ! "$PY" -m pip install --no-deps --no-build-isolation -q -e . >"$OUT/pip.log" 2>&1 || ! here; then
    tree=$(mktemp -d)
    cp -r kvsurgery "$tree/kvsurgery"
    cp -r kernels "$tree/kvsurgery/kernels"
    export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
    echo "pip install -e failed (see $OUT/pip.log); using a package tree in $tree" >&2
  fi
fi

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git -C "$REPO" rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv 2>/dev/null || echo "nvidia-smi unavailable"
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >&2

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script measures the GPU (run kvsurgery bench for CPU numbers)')"

args=(--out "$OUT/bench.json" --plot "$OUT/bench.png")
if [[ -n "${MODEL:-}" ]]; then
  args+=(--model "$MODEL")
fi
# progress goes to stderr (and bench.log); the tables, printed last, to stdout and table.txt
"$PY" -m kvsurgery.cli bench "${args[@]}" "$@" 2> >(tee "$OUT/bench.log" >&2) | tee "$OUT/table.txt"
# ClusterKV's options, decode only, same contexts and shape: estimate_rest (the SmolLM2
# recipes ship it: one more C x d read per step), spread_ranking (another), and both with
# 8-token clusters as recipes/clusterkv.yaml ships them (C = context/8 centroids per step,
# 10x the default's)
for flags in --cluster-estimate-rest --cluster-spread-ranking \
  "--cluster-estimate-rest --cluster-spread-ranking --tokens-per-cluster 8"; do
  name=clusterkv$(echo "$flags" | sed 's/--cluster//g; s/--/-/g; s/ //g')
  # shellcheck disable=SC2086
  "$PY" -m kvsurgery.cli bench "$@" --methods clusterkv $flags --no-prefill \
    --out "$OUT/$name.json" 2>>"$OUT/bench.log" | tee "$OUT/$name.txt"
done
# OMP encoders side by side (Gram kernel, GEMM variant bf16 / fp32, its launch sweep)
"$PY" scripts/bench_omp_gpu.py 2>>"$OUT/bench.log" | tee "$OUT/omp.txt"
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')" >&2
