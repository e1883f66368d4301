"""Sweep the KV-Dict decode kernel's launch parameters (tokens per tile, warps, waves of
split programs) at the Llama-3-8B shape, bf16, on the state `kvsurgery bench` times; prints
each config's median time (triton do_bench, eager launches) and its error against the torch
reference, then the five best per cell. Needs a CUDA GPU. On an H100 (2026-11-24) 256
tokens x 8 warps x 2 waves was best at 128k batch 1 and 32k batch 8 (the defaults since).

    python scripts/sweep_kvdict_gpu.py
"""

import itertools

import torch
import triton
from kvsurgery.kernels import kvdict_attention as kva

from kvsurgery import bench_methods as bm
from kvsurgery.bench import BenchConfig

CELLS = [(1, 32768), (1, 131072), (8, 32768)]


def median_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=20, rep=60, return_mode="median") * 1e3


def sweep_cell(B: int, ctx: int, cfg: BenchConfig, n_sm: int) -> list[tuple]:
    shape = bm.Shape(B, ctx, 32, 8, 128, torch.bfloat16, torch.device("cuda"))
    g = bm._gen(shape, 0)
    L = bm.KVDICT.build(shape, cfg, g).obj
    q = bm._query(shape, g)
    n = L.n_comp
    args = (L._map_query(q), L.dk, L.dv, L.k_idx[:, :, :n], L.k_coef[:, :, :n],
            L.v_idx[:, :, :n], L.v_coef[:, :, :n], torch.cat([L.sink_k, L.buf_k], 2),
            torch.cat([L.sink_v, L.buf_v], 2), 128**-0.5)  # fmt: skip
    ref = kva.kvdict_attention_ref(*args).float()
    rows = []
    for bt, nw, waves in itertools.product([32, 64, 128, 256], [4, 8], [2, 4, 8, 16]):
        split_len = -(-n // max(1, waves * n_sm // (B * 8)))

        def run(bt=bt, nw=nw, split_len=split_len):
            return kva.kvdict_decode_triton(*args, block_t=bt, split_len=split_len, num_warps=nw)

        try:
            out = run().float()
            err = float((out - ref).norm() / ref.norm())
            t = median_us(run)
        except Exception as e:  # a config that does not compile or fit is reported, not fatal
            print(f"B={B} ctx={ctx} block_t={bt} warps={nw} waves={waves}: failed {e!r:.200}")
            continue
        rows.append((B, ctx, bt, nw, waves, t, err))
        print(f"B={B} ctx={ctx} block_t={bt} warps={nw} waves={waves}: {t:8.1f} us err {err:.1e}")
    print(f"B={B} ctx={ctx} defaults: {median_us(lambda: kva.kvdict_decode_triton(*args)):.1f} us")
    return rows


def main():
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script times GPU kernels")
    cfg = BenchConfig(methods=("kvdict",)).resolve(torch.device("cuda"))
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    res = []
    with torch.inference_mode():
        for B, ctx in CELLS:
            res += sweep_cell(B, ctx, cfg, n_sm)
            torch.cuda.empty_cache()
    print("== five best per cell: (batch, context, block_t, warps, waves, us, rel. error)")
    for B, ctx in CELLS:
        for r in sorted((r for r in res if r[:2] == (B, ctx)), key=lambda r: r[5])[:5]:
            print(r)


if __name__ == "__main__":
    main()
