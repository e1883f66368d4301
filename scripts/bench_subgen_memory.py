"""SubGen cache memory vs context length on SmolLM2-135M, and its growth exponent.

For each context n: a fresh SubGen cache, prefill n tokens of built-in text, one decode
step (which streams everything that left the window into the clusters and reservoirs),
then the bytes the cache has allocated (measured tensor storages). The growth exponent is
the slope of log(bytes) against log(n) (least squares), over 2k..8k and over all points.

    python scripts/bench_subgen_memory.py                       # training-free radius
    python scripts/bench_subgen_memory.py --calibration DIR     # calibrated radii
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def fit_exponent(ns: list[int], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(n)."""
    xs = [math.log(n) for n in ns]
    ls = [math.log(y) for y in ys]
    mx, my = sum(xs) / len(xs), sum(ls) / len(ls)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ls, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model alias or folder")
    ap.add_argument("--calibration", default=None, help="calibration folder with subgen results")
    ap.add_argument("--contexts", default="1024,2048,4096,8192", help="comma-separated lengths")
    ap.add_argument(
        "--set", nargs="*", default=[], help="recipe overrides key=value (no calibration)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from kvsurgery.data import builtin_documents, pack_tokens
    from kvsurgery.export import apply_default, apply_to_model
    from kvsurgery.models import load_model, model_dims
    from kvsurgery.recipes import apply_overrides, default_recipe, parse_set_options
    from kvsurgery.runtime.kvs_attention import ATTN_NAME
    from kvsurgery.runtime.kvs_methods import build_cache

    model, tok, _ = load_model(args.model)
    model.eval()
    if args.calibration:
        apply_to_model(model, args.calibration, "subgen")
    else:
        recipe = apply_overrides(default_recipe("subgen"), parse_set_options(args.set))
        apply_default(model, "subgen", recipe)
    model.set_attn_implementation(ATTN_NAME)
    dims = model_dims(model.config)
    ns = [int(x) for x in args.contexts.split(",")]
    ids = pack_tokens(builtin_documents("reverse"), tok, 1, max(ns) + 1)[0].view(1, -1)
    rows = []
    for n in ns:
        cache = build_cache(model)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids[:, :n], past_key_values=cache, use_cache=True)
            model(ids[:, n : n + 1], past_key_values=cache, use_cache=True)  # streams
        sec = time.perf_counter() - t0
        nbytes = cache.nbytes()
        full16 = (n + 1) * dims["num_layers"] * dims["num_kv_heads"] * dims["head_dim"] * 2 * 2
        layers = [x for x in cache.layers if hasattr(x, "n_clusters")]
        clusters = sum(float(x.n_clusters.float().mean()) for x in layers) / max(len(layers), 1)
        # bytes if the state were fp16 (the model may run in fp32 on CPU)
        es = torch.finfo(model.dtype).bits // 8
        rows.append((n, nbytes, nbytes * 2 / es / full16, clusters, sec))
        print(f"n={n}: {nbytes / 2**20:.2f} MiB, {sec:.1f}s", flush=True)
    print()
    print("| context | SubGen bytes (MiB) | vs fp16 full cache | clusters / kv head (mean) | s |")
    print("|---|---|---|---|---|")
    for n, b, r, c, sec in rows:
        print(f"| {n} | {b / 2**20:.2f} | {r:.1%} | {c:.0f} | {sec:.0f} |")
    big = [(n, b) for n, b, *_ in rows if n >= 2048]
    if len(big) >= 2:
        print(f"\ngrowth exponent 2k..8k: {fit_exponent(*zip(*big, strict=True)):.3f}")
    print(f"growth exponent all:    {fit_exponent([r[0] for r in rows], [r[1] for r in rows]):.3f}")


if __name__ == "__main__":
    main()
