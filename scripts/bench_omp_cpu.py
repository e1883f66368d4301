"""Time the two torch OMP routes on the CPU: the Gram reference (``omp_ref``) and the CPU
route the dispatcher takes for CPU tensors (``omp_cpu``: residual correlations as one
matrix product per step). Prints vectors/s (median of timed runs after a warm-up), the
speed-up, the share of vectors coded with the same atoms and both routes' mean relative
residual. Calibration and CPU inference encode through ``omp()``, so this is what their
OMP costs. Vectors are random unless ``--calibration`` names a calibration folder: then
they are that layer's captured keys (in the query metric when it has a key map) coded with
its learned key dictionary.

    python scripts/bench_omp_cpu.py [--vectors 8192] [--s 2,8,16] [--atoms 4096] [--dim 64]
    python scripts/bench_omp_cpu.py --calibration cal --layer 17
"""

import argparse
import statistics

import torch
from kvsurgery.kernels import omp as K
from safetensors.torch import load_file

from kvsurgery import bench_methods as bm
from kvsurgery.capture import load_layer
from kvsurgery.kvdict_calibrate import SUBDIR, _per_head


def _captured(calib_dir: str, layer: int, n: int):
    state = load_file(f"{calib_dir}/{SUBDIR}/layer_{layer:03d}.safetensors")
    cap = load_layer(calib_dir, layer)
    keys = cap["keys"].float()
    if "kmap" in state:  # the dictionary was learned on keys in their queries' metric
        keys = _per_head(keys, cap["heads"].long(), state["kmap"].float())
    keys = keys[keys.norm(dim=1) > 0][:n]
    return keys / keys.norm(dim=1, keepdim=True), state["dk"].float()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vectors", type=int, default=8192)
    ap.add_argument("--s", default="2,8,16", help="comma-separated code lengths")
    ap.add_argument("--atoms", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64, help="SmolLM2's head_dim")
    ap.add_argument("--calibration", help="calibration folder: code its captured keys")
    ap.add_argument("--layer", type=int, default=17)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if a.calibration:
        x, D = _captured(a.calibration, a.layer, a.vectors)
        what = f"captured keys of layer {a.layer}, its key dictionary"
    else:
        g = torch.Generator().manual_seed(0)
        D = bm.unit_dictionary(a.dim, a.atoms, g, torch.device("cpu"))
        x = torch.randn(a.vectors, a.dim, generator=g)
        what = "random vectors and dictionary"
    G = D.T @ D
    print(f"# CPU, {torch.get_num_threads()} threads; M = {x.shape[0]}, N = {D.shape[1]}, "
          f"d = {D.shape[0]}; {what}")  # fmt: skip

    def timed(fn):  # the warm-up call's codes, and the median of timed calls after it
        out = fn()
        cpu = torch.device("cpu")
        return out, statistics.median(bm.time_calls(lambda f: f(), [fn], 0, a.repeats, cpu))

    def rel_err(idx, coef) -> float:
        rec = K.reconstruct(idx, coef, D)
        return float(((rec - x).norm(dim=1) / x.norm(dim=1)).mean())

    with torch.inference_mode():
        for s in (int(v) for v in a.s.split(",")):
            (ri, rc), tr = timed(lambda s=s: K.omp_ref(x, D, s, gram=G))
            (ci, cc), tc = timed(lambda s=s: K.omp_cpu(x, D, s))
            same = float((ri == ci).all(1).float().mean())
            print(f"s = {s:2d}: reference {x.shape[0] / tr:9.0f} vectors/s, CPU route "
                  f"{x.shape[0] / tc:9.0f} vectors/s ({tr / tc:.1f}x); same atoms {same:.2%}; "
                  f"mean rel. residual {rel_err(ci, cc):.4f} (reference {rel_err(ri, rc):.4f})")  # fmt: skip


if __name__ == "__main__":
    main()
