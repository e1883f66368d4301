"""Time the OMP encoders on a GPU at KV-Dict's prefill shape (s = 8, N = 4096, d = 128 by
default; the issue's target is >= 50 M vectors/s on an H100): the torch reference, the
Triton Gram kernel (the dispatcher's choice) and the Triton GEMM variant with bf16 and fp32
correlations, then a sweep of the GEMM variant's launch settings. Prints vectors/s (median
of CUDA-event timed runs) and each variant's mean relative residual next to the
reference's, so a faster encoder that codes worse shows it. Needs a CUDA GPU.

    python scripts/bench_omp_gpu.py [--vectors 262144] [--s 8] [--atoms 4096] [--dim 128]
"""

import argparse
import itertools
import statistics

import torch
from kvsurgery.kernels import omp as K

from kvsurgery import bench_methods as bm


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--vectors", type=int, default=262144, help="one layer's keys at 32k, 8 KV heads"
    )
    ap.add_argument("--s", type=int, default=8)
    ap.add_argument("--atoms", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-sweep", action="store_true", help="only the default launch settings")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script times GPU kernels")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    D = bm.unit_dictionary(a.dim, a.atoms, g, dev)
    G = D.T @ D
    x = torch.randn(a.vectors, a.dim, generator=g, device=dev)
    print(f"# {torch.cuda.get_device_name()}, M = {a.vectors}, s = {a.s}, N = {a.atoms}, "
          f"d = {a.dim}; target 50 M vectors/s")  # fmt: skip

    def median_s(fn) -> float:  # one warm-up call (compiles), then CUDA-event timed calls
        return statistics.median(bm.time_calls(lambda f: f(), [fn], 1, a.repeats, dev))

    def rel_err(idx, coef) -> float:
        rec = K.reconstruct(idx, coef, D)
        return float(((rec - x).norm(dim=1) / x.norm(dim=1)).mean())

    variants = {
        "torch reference": lambda: K.omp_ref(x, D, a.s, gram=G),
        "triton gram": lambda: K.omp_triton(x, D, a.s, gram=G, algorithm="gram"),
        "triton gemm bf16": lambda: K.omp_triton(x, D, a.s, algorithm="gemm"),
        "triton gemm fp32": lambda: K.omp_triton(x, D, a.s, algorithm="gemm", corr_dtype="float32"),
    }
    ref_err = None
    with torch.inference_mode():
        for name, fn in variants.items():
            try:
                err = rel_err(*fn())
                t = median_s(fn)
            except Exception as e:  # one failing variant is reported, the rest still run
                print(f"{name:>18}: FAILED {e!r:.300}")
                continue
            ref_err = err if ref_err is None else ref_err
            print(f"{name:>18}: {a.vectors / t / 1e6:8.2f} M vectors/s ({t * 1e3:9.1f} ms), "
                  f"mean rel. residual {err:.4f} (reference {ref_err:.4f})")  # fmt: skip
        if a.no_sweep:
            return
        print("# GEMM variant (bf16) launch sweep: corr_m corr_n corr_warps step_m step_warps")
        rows = []
        for (cm, cn, cw), (sm, sw) in itertools.product(
            [(128, 128, 8), (128, 256, 8), (128, 64, 4), (64, 128, 4), (256, 128, 8)],
            [(16, 4), (32, 8), (8, 2)],
        ):
            launch = dict(corr_m=cm, corr_n=cn, corr_warps=cw, step_m=sm, step_warps=sw)

            def fn(launch=launch):
                return K.omp_triton(x, D, a.s, algorithm="gemm", **launch)

            try:
                err = rel_err(*fn())
                t = median_s(fn)
            except Exception as e:
                print(f"{cm} {cn} {cw} {sm} {sw}: FAILED {e!r:.200}")
                continue
            rows.append((a.vectors / t / 1e6, cm, cn, cw, sm, sw, err))
            print(f"{cm} {cn} {cw} {sm} {sw}: {rows[-1][0]:8.2f} M vectors/s, residual {err:.4f}")
        print("# best three:", *sorted(rows, reverse=True)[:3], sep="\n")


if __name__ == "__main__":
    main()
