#!/usr/bin/env bash
# Set up this checkout (CPU-only torch from the pinned wheel, editable install) and run the
# test suite. Triton kernels run under the interpreter (no GPU needed).
#   bash scripts/test.sh            # default suite (CI)
#   bash scripts/test.sh -m slow    # the slow tests on the real model
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch is pinned here: an unpinned install would pull several GB of CUDA packages.
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[test]"
# PYTHONSAFEPATH keeps the checkout root off sys.path, so the folder kernels/ can never be
# imported as a top-level `kernels` (Hugging Face's package of that name).
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONSAFEPATH=1
exec "$PY" -m pytest "$@"
