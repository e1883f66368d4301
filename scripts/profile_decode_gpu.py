"""Where a decode step's GPU time goes: per-kernel CUDA time (torch.profiler) of each
method's decode attention at the Llama-3-8B shape (32 query / 8 KV heads, d = 128, bf16),
with the same layer state `kvsurgery bench` times. Needs a CUDA GPU.

    python scripts/profile_decode_gpu.py --contexts 32768,131072 --methods kvdict,clusterkv
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from kvsurgery import bench_methods as bm
from kvsurgery.bench import BenchConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--methods", default="kvdict,clusterkv,subgen")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script profiles GPU kernels")
    dev = torch.device("cuda")
    cfg = BenchConfig(methods=tuple(a.methods.split(","))).resolve(dev)
    for ctx in (int(c) for c in a.contexts.split(",")):
        for name in cfg.methods:
            m = bm.METHODS[name]
            shape = bm.Shape(a.batch, ctx, 32, 8, 128, torch.bfloat16, dev)
            g = bm._gen(shape, 0)
            with torch.inference_mode():
                st = m.build(shape, cfg, g)
                q = bm._query(shape, g)
                for _ in range(5):  # compile and warm up
                    m.step(st, q)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(a.steps):
                        m.step(st, q)
                    torch.cuda.synchronize()
            print(f"===== {name}, batch {a.batch}, context {ctx} ({a.steps} steps)")
            print(
                prof.key_averages().table(
                    sort_by="cuda_time_total", row_limit=14, max_name_column_width=70
                )
            )
            del st
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
