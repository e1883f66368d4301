#!/usr/bin/env python
"""Per-layer decode attention time: KV-Dict Triton kernel vs dense SDPA on the same length.

On CUDA both run in the same process, timed with CUDA events (median over many
iterations), each iteration on a different copy of the inputs so that the working set
exceeds L2. On CPU it times the torch reference against dense SDPA at small contexts;
those numbers say nothing about GPU speed and are labelled as CPU numbers.

Example (defaults = one Llama-3-8B layer: 32 query heads, 8 KV heads, d=128, bf16,
N=4096 atoms, s=8, 128 exact tokens)::

    python scripts/bench_kvdict_attention.py --contexts 4096,32768,131072 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from kvsurgery.kernels.kvdict_attention import (
    code_bytes_per_token,
    kvdict_attention_ref,
    kvdict_decode_triton,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--heads", type=int, default=32, help="query heads H")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads H_kv")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--n-atoms", type=int, default=4096, help="N_k = N_v unless overridden")
    p.add_argument("--n-atoms-k", type=int, default=None)
    p.add_argument("--n-atoms-v", type=int, default=None)
    p.add_argument("--sparsity", type=int, default=8, help="s_k = s_v unless overridden")
    p.add_argument("--s-k", type=int, default=None)
    p.add_argument("--s-v", type=int, default=None)
    p.add_argument("--buffer", type=int, default=128, help="exact tokens (sinks + recent)")
    p.add_argument(
        "--contexts",
        default=None,
        help="comma list (default 4096,32768,131072 on CUDA, 512,2048 on CPU)",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--iters", type=int, default=None, help="timed iterations (default 200 CUDA / 5 CPU)"
    )
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument(
        "--copies", type=int, default=None, help="input copies rotated (default: > 2x L2)"
    )
    p.add_argument("--block-t", type=int, default=64)
    p.add_argument("--split-len", type=int, default=None)
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--no-check", action="store_true", help="skip the kernel-vs-reference check")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--json", default=None, metavar="OUT", help="write the numbers here")
    return p.parse_args(argv)


def make_inputs(a, L, device, seed):
    """One set of decode inputs for a context of L tokens (L - buffer compressed)."""
    gen = torch.Generator(device=device).manual_seed(seed)  # generate in place: 131k-token K/V
    dt = DTYPES[a.dtype]
    B, H, Hkv, d = a.batch, a.heads, a.kv_heads, a.head_dim
    E = min(a.buffer, L)
    T = L - E

    def rn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    c = dict(
        # one dictionary pair per copy: in a real step each layer brings its own
        Dk=torch.nn.functional.normalize(rn(d, a.N_k), dim=0),
        Dv=torch.nn.functional.normalize(rn(d, a.N_v), dim=0),
        q=rn(B, H, 1, d).to(dt),
        k_idx=torch.randint(
            0, a.N_k, (B, Hkv, T, a.s_k), generator=gen, dtype=torch.int16, device=device
        ),
        k_coef=rn(B, Hkv, T, a.s_k).to(torch.float8_e4m3fn),
        v_idx=torch.randint(
            0, a.N_v, (B, Hkv, T, a.s_v), generator=gen, dtype=torch.int16, device=device
        ),
        v_coef=rn(B, Hkv, T, a.s_v).to(torch.float8_e4m3fn),
        k_exact=rn(B, Hkv, E, d).to(dt),
        v_exact=rn(B, Hkv, E, d).to(dt),
        # dense K/V of the same length: only their size and layout matter for timing
        k=rn(B, Hkv, L, d).to(dt),
        v=rn(B, Hkv, L, d).to(dt),
    )
    return c


def set_bytes(c):
    return sum(v.numel() * v.element_size() for v in c.values())


def time_cuda(fn, inputs, iters, warmup):
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        x = inputs[i % len(inputs)]
        starts[i].record()
        fn(x)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(
        s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True)
    )  # us


def time_cuda_graph(fn, inputs, iters, warmup):
    """Same, replaying one CUDA graph per input copy: GPU time without launch overhead
    (the per-step launches of the KV-Dict path would otherwise dominate short contexts)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile kernels / warm cuBLAS outside the capture
        for x in inputs:
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for x in inputs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(x)
        graphs.append(g)
    t = time_cuda(lambda g: g.replay(), graphs, iters, warmup)
    del graphs
    return t


def time_cpu(fn, inputs, iters, warmup):
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    ts = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(inputs[i % len(inputs)])
        ts.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(ts)


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    a.N_k = a.n_atoms_k or a.n_atoms
    a.N_v = a.n_atoms_v or a.n_atoms
    a.s_k = a.s_k or a.sparsity
    a.s_v = a.s_v or a.sparsity
    contexts = [
        int(x) for x in (a.contexts or ("4096,32768,131072" if on_cuda else "512,2048")).split(",")
    ]
    iters = a.iters or (200 if on_cuda else 5)
    warmup = a.warmup if a.warmup is not None else (20 if on_cuda else 1)
    d, scale = a.head_dim, 1.0 / math.sqrt(a.head_dim)

    if on_cuda:
        label = f"CUDA: {torch.cuda.get_device_name(device)}"
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    else:
        label = "CPU NUMBERS (torch reference, not the Triton kernel; says nothing about GPU speed)"
        l2 = 32 << 20
    print(f"# {label}")
    print(
        f"# shape: B={a.batch} H={a.heads} H_kv={a.kv_heads} d={d} {a.dtype} "
        f"N_k={a.N_k} N_v={a.N_v} s_k={a.s_k} s_v={a.s_v} exact={a.buffer}"
    )
    code_b = code_bytes_per_token(a.s_k, a.s_v)
    dense_b = 2 * d * 2
    print(
        f"# bytes/token/kv-head: codes {code_b} (int16 idx + fp8 coef, K+V) vs fp16 K+V {dense_b}"
        f" -> {dense_b / code_b:.1f}x smaller; per layer {code_b * a.kv_heads} vs {dense_b * a.kv_heads}"
    )
    print(
        f"# dictionaries (fp32, per layer, shared by all tokens): {(a.N_k + a.N_v) * d * 4 / 2**20:.2f} MiB"
    )

    def kvdict(x):
        if on_cuda:
            return kvdict_decode_triton(
                x["q"], x["Dk"], x["Dv"], x["k_idx"], x["k_coef"], x["v_idx"], x["v_coef"],
                x["k_exact"], x["v_exact"], scale,
                block_t=a.block_t, split_len=a.split_len, num_warps=a.num_warps,
            )  # fmt: skip
        return kvdict_attention_ref(
            x["q"], x["Dk"], x["Dv"], x["k_idx"], x["k_coef"], x["v_idx"], x["v_coef"],
            x["k_exact"], x["v_exact"], scale,
        )  # fmt: skip

    def dense(x):
        return torch.nn.functional.scaled_dot_product_attention(
            x["q"], x["k"], x["v"], scale=scale, enable_gqa=True
        )

    rows = []
    for L in contexts:
        one = make_inputs(a, L, device, seed=L)
        copies = a.copies or max(2, min(16, math.ceil(2 * l2 / max(1, set_bytes(one)))))
        inputs = [one] + [make_inputs(a, L, device, seed=L + i) for i in range(1, copies)]
        err = None
        if not a.no_check and on_cuda and L == contexts[0]:
            ref = kvdict_attention_ref(
                one["q"], one["Dk"], one["Dv"], one["k_idx"], one["k_coef"], one["v_idx"], one["v_coef"],
                one["k_exact"], one["v_exact"], scale,
            )  # fmt: skip
            err = (kvdict(one).float() - ref.float()).abs().max().item()
            print(f"# check at L={L}: max |triton - reference| = {err:.3e}")
        timer = time_cuda if on_cuda else time_cpu
        t_kv = timer(kvdict, inputs, iters, warmup)
        t_dense = timer(dense, inputs, iters, warmup)
        g_kv = g_dense = None
        if on_cuda and not a.no_graph:
            g_kv = time_cuda_graph(kvdict, inputs, iters, warmup)
            g_dense = time_cuda_graph(dense, inputs, iters, warmup)
        rows.append(
            dict(
                context=L,
                compressed=L - min(a.buffer, L),
                exact=min(a.buffer, L),
                kvdict_us=t_kv,
                dense_sdpa_us=t_dense,
                speedup=t_dense / t_kv,
                kvdict_graph_us=g_kv,
                dense_sdpa_graph_us=g_dense,
                speedup_graph=(g_dense / g_kv) if g_kv else None,
                copies=copies,
                max_abs_err_vs_ref=err,
            )
        )
        del inputs, one
        if on_cuda:
            torch.cuda.empty_cache()

    name = "kvdict_triton" if on_cuda else "kvdict_ref(CPU)"
    print(f"\n# per-layer decode attention, median of {iters} iterations ({label})")
    graphs = any(r["kvdict_graph_us"] is not None for r in rows)
    head = f"{'context':>9} {'copies':>6} {name + ' us':>18} {'dense sdpa us':>14} {'dense/kvdict':>12}"
    if graphs:
        head += f" {'kvdict graph us':>16} {'dense graph us':>15} {'graph ratio':>11}"
    print(head)
    for r in rows:
        line = (
            f"{r['context']:>9} {r['copies']:>6} {r['kvdict_us']:>18.1f} "
            f"{r['dense_sdpa_us']:>14.1f} {r['speedup']:>12.2f}"
        )
        if graphs:
            line += (
                f" {r['kvdict_graph_us']:>16.1f} {r['dense_sdpa_graph_us']:>15.1f}"
                f" {r['speedup_graph']:>11.2f}"
            )
        print(line)
    if a.json:
        out = dict(
            device=label,
            args={k: v for k, v in vars(a).items() if k != "json"},
            bytes_per_token_per_kv_head=dict(codes=code_b, dense_fp16=dense_b),
            rows=rows,
        )
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"# wrote {a.json}")


if __name__ == "__main__":
    main()
