"""The method table of `kvsurgery bench` and its measurements (decode, prefill, generate).

A method is one :class:`BenchMethod` entry in :data:`METHODS`: how to build its decode
state for a shape, one decode step on that state, an fp32 reference of the step, the
compression work of a prefill, and how to install it on a model for ``generate``. Adding
a method to the bench is adding an entry; the command, the JSON and the tables follow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .bench import BenchConfig, device_label, plot_results
from .errors import KVSurgeryError

RESULTS_VERSION = 1
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Input sets per cell are capped: beyond a few the rotation only costs memory.
_MAX_COPIES = 16


@dataclass(frozen=True)
class Shape:
    """One decode cell: ``q (batch, heads, 1, head_dim)`` over ``context`` cached tokens."""

    batch: int
    context: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5


def _gen(shape_or_device, seed: int) -> torch.Generator:
    dev = getattr(shape_or_device, "device", shape_or_device)
    return torch.Generator(device=dev).manual_seed(int(seed))


def _randn(shape: Shape, *size, g, dtype=None) -> torch.Tensor:
    x = torch.randn(*size, generator=g, device=shape.device, dtype=torch.float32)
    return x.to(dtype or shape.dtype)


def _query(shape: Shape, g) -> torch.Tensor:
    return _randn(shape, shape.batch, shape.heads, 1, shape.head_dim, g=g)


def _storage_bytes(*tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def pair_scales(h: int, d: int, g, device) -> torch.Tensor:
    """Random ``(h, d)`` positive key-map scales, one per rotary pair, like calibration's
    ``query_weighting`` maps: the decode step then pays for reading its query through them."""
    w = torch.rand(h, d // 2, generator=g, device=device) + 0.5
    return w.repeat(1, 2)


def unit_dictionary(d: int, n: int, g, device) -> torch.Tensor:
    """Random ``(d, n)`` fp32 dictionary with unit-norm columns."""
    D = torch.randn(d, n, generator=g, device=device)
    return D / D.norm(dim=0, keepdim=True)


# -- methods ------------------------------------------------------------------------------
@dataclass
class State:
    """A method's decode state for one shape; ``tensors`` are everything it keeps per
    sequence, ``fixed`` what it keeps per layer whatever the context (dictionaries)."""

    obj: object
    tensors: Callable[[], int]  # measured cache bytes
    fixed: int = 0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BenchMethod:
    """One row of :data:`METHODS`.

    ``build(shape, cfg, g) -> State``; ``step(state, q) -> out``; ``reference(state, q)``
    -> the same output computed by the torch reference in fp32; ``prefill(k, v, cfg, g)``
    -> ``(what, thunk)``, the compression work one prefill of keys/values ``(B, H_kv, L,
    d)`` costs; ``install(model, cfg, g)`` puts the method on a model for ``generate``.
    """

    name: str
    build: Callable
    step: Callable
    reference: Callable | None = None
    prefill: Callable | None = None
    install: Callable | None = None
    min_context: Callable = lambda cfg: 1
    missing: Callable = lambda: None  # why the method cannot run here, or None


def _dense_build(shape: Shape, cfg: BenchConfig, g) -> State:
    size = (shape.batch, shape.kv_heads, shape.context, shape.head_dim)
    k, v = _randn(shape, *size, g=g), _randn(shape, *size, g=g)
    return State((k, v), lambda: _storage_bytes(k, v))


def _dense_step(state: State, q):
    k, v = state.obj
    # the default scale is d^-0.5, as for the methods; passing it explicitly sent the CPU
    # path to a slower kernel (torch 2.13)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _dense_reference(state: State, q):
    from .kernels.kvdict_attention import dense_attention_fp32

    k, v = state.obj
    return dense_attention_fp32(q, k, v, q.shape[-1] ** -0.5)


DENSE = BenchMethod("dense", _dense_build, _dense_step, _dense_reference)


# KV-Dict ---------------------------------------------------------------------------------
def _kvdict_build(shape: Shape, cfg: BenchConfig, g) -> State:
    """A KVDictLayer holding ``context`` tokens: sinks and buffer exact, the rest random codes.

    The codes are written straight into the layer's storage, laid out as ``update`` would
    leave them (capacity in CODE_BLOCK steps), so the step and the measured bytes are the
    runtime's; encoding them with OMP is the prefill measurement, not repeated here.
    """
    from .runtime.kvs_cache import CODE_BLOCK, KVDictLayer

    B, H, d, L = shape.batch, shape.kv_heads, shape.head_dim, shape.context
    dk = unit_dictionary(d, cfg.n_atoms, g, shape.device)
    dv = unit_dictionary(d, cfg.n_atoms, g, shape.device)
    w = pair_scales(H, d, g, shape.device)  # as from_pretrained hands a calibrated map over
    layer = KVDictLayer(dk, dv, None, None, cfg.s_k, cfg.s_v, sinks=cfg.kvdict_sinks,
                        buffer=cfg.kvdict_buffer, kmap=w, qmap=1 / w)  # fmt: skip
    empty = torch.zeros(B, H, 0, d, dtype=shape.dtype, device=shape.device)
    layer.lazy_initialization(empty, empty)
    n_s, n_b = cfg.kvdict_sinks, cfg.kvdict_buffer
    n_c = L - n_s - n_b
    cap = -(-n_c // CODE_BLOCK) * CODE_BLOCK
    layer.sink_k, layer.sink_v = (_randn(shape, B, H, n_s, d, g=g) for _ in range(2))
    layer.buf_k, layer.buf_v = (_randn(shape, B, H, n_b, d, g=g) for _ in range(2))

    def codes(s):
        idx = torch.randint(0, cfg.n_atoms, (B, H, cap, s), generator=g, device=shape.device)
        coef = _randn(shape, B, H, cap, s, g=g, dtype=torch.float32)
        return idx.to(torch.int16), coef.to(layer.coef_dtype)

    layer.k_idx, layer.k_coef = codes(cfg.s_k)
    layer.v_idx, layer.v_coef = codes(cfg.s_v)
    layer.n_comp, layer.seen, layer.last_had_past = n_c, L, True
    return State(layer, layer.nbytes, fixed=_storage_bytes(dk, dv))


def _attend(state: State, q):
    return state.obj.attend(q, None, q.shape[-1] ** -0.5)


def _kvdict_reference(state: State, q):
    from .kernels.kvdict_attention import kvdict_attention_ref

    L = state.obj
    n = L.n_comp
    out = kvdict_attention_ref(
        L._map_query(q), L.dk, L.dv, L.k_idx[:, :, :n], L.k_coef[:, :, :n], L.v_idx[:, :, :n],
        L.v_coef[:, :, :n], torch.cat([L.sink_k, L.buf_k], 2), torch.cat([L.sink_v, L.buf_v], 2),
        q.shape[-1] ** -0.5,
    )  # fmt: skip
    return out.transpose(1, 2)


def _kvdict_prefill(k, v, cfg: BenchConfig, g):
    from .kernels.omp import omp

    d = k.shape[-1]
    dk, dv = (unit_dictionary(d, cfg.n_atoms, g, k.device) for _ in range(2))
    gk, gv = dk.T @ dk, dv.T @ dv  # per layer, computed once at load: not timed
    xk, xv = k.reshape(-1, d), v.reshape(-1, d)

    def run():
        omp(xk, dk, cfg.s_k, gram=gk)
        omp(xv, dv, cfg.s_v, gram=gv)

    return f"OMP encode K+V ({xk.shape[0]} + {xv.shape[0]} vectors)", run


def _kvdict_install(model, cfg: BenchConfig, g):
    from .runtime.kvs_attention import FORMAT_VERSION, attention_modules, install

    mods = attention_modules(model)
    d = mods[0].head_dim
    dev = next(model.parameters()).device
    layer = {"s_k": cfg.s_k, "s_v": cfg.s_v, "n_atoms_k": cfg.n_atoms, "n_atoms_v": cfg.n_atoms}
    block = {
        "format_version": FORMAT_VERSION,
        "method": "kvdict",
        "layers": [dict(layer) for _ in mods],
        "sinks": cfg.kvdict_sinks,
        "buffer": cfg.kvdict_buffer,
        "flush": 16,
        "omp_tol": None,
        "coef_dtype": "float8_e4m3fn",
        "code_bytes_ratio": 3 * (cfg.s_k + cfg.s_v) / (4 * d),
        "key_map": True,
    }
    cfg_m = mods[0].config
    n_kv = getattr(cfg_m, "num_key_value_heads", None) or cfg_m.num_attention_heads
    tensors = {
        i: {
            "kvsurgery_dk": unit_dictionary(d, cfg.n_atoms, g, dev),
            "kvsurgery_dv": unit_dictionary(d, cfg.n_atoms, g, dev),
            "kvsurgery_kmap": torch.diag_embed(pair_scales(n_kv, d, g, dev)),
        }
        for i in range(len(mods))
    }
    install(model, block, tensors)


KVDICT = BenchMethod(
    "kvdict",
    _kvdict_build,
    _attend,
    _kvdict_reference,
    _kvdict_prefill,
    _kvdict_install,
    min_context=lambda cfg: cfg.kvdict_sinks + cfg.kvdict_buffer + 1,
)


# ClusterKV -------------------------------------------------------------------------------
def _clusterkv_layer(cfg: BenchConfig):
    from .runtime.kvs_clusterkv import ClusterKVLayer

    return ClusterKVLayer(budget=cfg.budget, sinks=cfg.cluster_sinks, window=cfg.window,
                          tokens_per_cluster=cfg.tokens_per_cluster,
                          kmeans_iters=cfg.kmeans_iters, seed=cfg.seed,
                          estimate_rest=cfg.cluster_estimate_rest,
                          spread_ranking=cfg.cluster_spread_ranking)  # fmt: skip


def _clusterkv_build(shape: Shape, cfg: BenchConfig, g) -> State:
    """A ClusterKVLayer after a prefill of ``context`` random keys, clustered as its first
    decode step would (the k-means is the prefill measurement)."""
    B, H, d, L = shape.batch, shape.kv_heads, shape.head_dim, shape.context
    layer = _clusterkv_layer(cfg)
    layer.update(_randn(shape, B, H, L, d, g=g), _randn(shape, B, H, L, d, g=g))
    valid = torch.ones(B, L, dtype=torch.bool, device=shape.device)
    layer._maybe_cluster(valid)
    layer.last_had_past = True
    return State(layer, layer.nbytes, extra={"clusters": layer.n_clusters, "valid": valid})


def _clusterkv_reference(state: State, q):
    from .kernels.clusterkv import sparse_attention_ref

    layer = state.obj
    scale = q.shape[-1] ** -0.5
    index, n_valid, rest, scores = layer._select(q, state.extra["valid"], None, scale)
    out = sparse_attention_ref(q, layer.keys, layer.values, index, n_valid, scale, rest is not None)
    if rest is not None:
        out = layer._merge_rest(out, rest, scores, scale)
    return out.transpose(1, 2)


def _clusterkv_prefill(k, v, cfg: BenchConfig, g):
    from .kernels.clusterkv import kmeans

    B, H, L, d = k.shape
    t0, t1 = min(cfg.cluster_sinks, L), max(min(cfg.cluster_sinks, L), L - 1 - cfg.window)
    x = k[:, :, t0:t1].reshape(B * H, t1 - t0, d)
    C = -(-(t1 - t0) // cfg.tokens_per_cluster)

    def run():
        kmeans(x, C, cfg.kmeans_iters, seed=cfg.seed)

    return f"k-means K ({B * H} heads x {t1 - t0} keys, {C} clusters, {cfg.kmeans_iters} it)", run


def _clusterkv_install(model, cfg: BenchConfig, g):
    from .runtime.kvs_attention import FORMAT_VERSION, attention_modules, install

    n = len(attention_modules(model))
    block = {
        "format_version": FORMAT_VERSION,
        "method": "clusterkv",
        "layers": [
            {"budget": cfg.budget, "tokens_per_cluster": cfg.tokens_per_cluster} for _ in range(n)
        ],
        "sinks": cfg.cluster_sinks,
        "window": cfg.window,
        "append_every": 320,
        "append_clusters": 8,
        "kmeans_iters": cfg.kmeans_iters,
        "seed": cfg.seed,
        "estimate_rest": cfg.cluster_estimate_rest,
        "spread_ranking": cfg.cluster_spread_ranking,
    }
    install(model, block, {})


CLUSTERKV = BenchMethod(
    "clusterkv",
    _clusterkv_build,
    _attend,
    _clusterkv_reference,
    _clusterkv_prefill,
    _clusterkv_install,
    min_context=lambda cfg: cfg.cluster_sinks + cfg.window + 2,
)


# SubGen (guarded: its kernels and runtime are optional) -----------------------------------
def _subgen_missing() -> str | None:
    for mod in ("kvsurgery.kernels.subgen", "kvsurgery.runtime.kvs_subgen"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    return None


def _subgen_layer(cfg: BenchConfig):
    from .runtime.kvs_subgen import SubGenLayer

    return SubGenLayer(delta_rel=cfg.subgen_delta_rel, t=cfg.subgen_t, s=cfg.subgen_s,
                       sinks=cfg.subgen_sinks, window=cfg.subgen_window, seed=cfg.seed,
                       max_clusters=cfg.subgen_max_clusters,
                       estimator=cfg.subgen_estimator)  # fmt: skip


def _clustered_keys(shape: Shape, cfg: BenchConfig, L: int, g) -> torch.Tensor:
    """Keys around ``ceil(L / subgen_cluster_tokens)`` random centres (noise 0.1 of the
    centre's scale): isotropic random keys are all far apart, and SubGen's threshold
    clustering would give every key its own cluster, which real keys do not do."""
    B, H, d = shape.batch, shape.kv_heads, shape.head_dim
    n_c = -(-L // cfg.subgen_cluster_tokens)
    centres = torch.randn(B, H, n_c, d, generator=g, device=shape.device)
    pick = torch.randint(0, n_c, (B, H, L), generator=g, device=shape.device)
    k = centres.gather(2, pick[..., None].expand(B, H, L, d))
    k = k + 0.1 * torch.randn(B, H, L, d, generator=g, device=shape.device)
    return k.to(shape.dtype)


def _subgen_build(shape: Shape, cfg: BenchConfig, g) -> State:
    """A SubGenLayer after a prefill of ``context`` tokens, streamed into its clusters and
    value reservoir by one decode step (the streaming is the prefill measurement)."""
    B, H, d, L = shape.batch, shape.kv_heads, shape.head_dim, shape.context
    layer = _subgen_layer(cfg)
    layer.update(_clustered_keys(shape, cfg, L, g), _randn(shape, B, H, L, d, g=g))
    layer.attend(_query(shape, g), None, shape.scale)  # streams what left the window
    layer.last_had_past = True
    return State(layer, layer.nbytes, extra={"clusters": int(layer.n_clusters.max())})


def _subgen_reference(state: State, q):
    from .kernels.subgen import STATE_KEYS, estimate_attention_ref

    layer = state.obj
    allowed = layer._valid_mask(None, 1, layer.win_k.shape[0], q.device)
    n_s, start = layer.sink_k.shape[2], layer.sink_k.shape[2] + layer.n_comp
    mask = torch.cat([allowed[:, :, :n_s], allowed[:, :, start:]], dim=-1)
    out = estimate_attention_ref(
        q, torch.cat([layer.sink_k, layer.win_k], 2), torch.cat([layer.sink_v, layer.win_v], 2),
        mask, {n: getattr(layer, n) for n in STATE_KEYS}, q.shape[-1] ** -0.5,
    )  # fmt: skip
    return out.transpose(1, 2)


def _subgen_prefill(k, v, cfg: BenchConfig, g):
    B, H, L, d = k.shape
    shape = Shape(B, L, H, H, d, k.dtype, k.device)
    kc = _clustered_keys(shape, cfg, L, g)
    q = _randn(shape, B, H, 1, d, g=g)
    n = max(0, L - min(cfg.subgen_sinks, L) - cfg.subgen_window)

    def run():
        layer = _subgen_layer(cfg)
        layer.update(kc, v)
        layer.attend(q, None, d**-0.5)

    return f"stream K+V into clusters/reservoir ({B * H} heads x {n} tokens)", run


def _subgen_install(model, cfg: BenchConfig, g):
    from .runtime.kvs_attention import FORMAT_VERSION, attention_modules, install

    n = len(attention_modules(model))
    block = {
        "format_version": FORMAT_VERSION,
        "method": "subgen",
        "layers": [
            {"t": cfg.subgen_t, "s": cfg.subgen_s, "max_clusters": cfg.subgen_max_clusters}
            for _ in range(n)
        ],
        "estimator": cfg.subgen_estimator,
        "delta_rel": cfg.subgen_delta_rel,
        "sinks": cfg.subgen_sinks,
        "window": cfg.subgen_window,
        "seed": cfg.seed,
    }
    install(model, block, {})


SUBGEN = BenchMethod(
    "subgen",
    _subgen_build,
    _attend,
    _subgen_reference,
    _subgen_prefill,
    _subgen_install,
    min_context=lambda cfg: cfg.subgen_sinks + cfg.subgen_window + 2,
    missing=_subgen_missing,
)

METHODS: dict[str, BenchMethod] = {"kvdict": KVDICT, "clusterkv": CLUSTERKV, "subgen": SUBGEN}


def available_methods() -> list[str]:
    return [name for name, m in METHODS.items() if not m.missing()]


# -- timing -------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, inputs: list, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds per call of ``fn(inputs[i % n])``: CUDA events around each call (launched
    back to back, as a decode loop does), else ``perf_counter``; warm-up calls first."""
    n = len(inputs)
    for i in range(warmup):
        fn(inputs[i % n])
    _sync(device)
    if device.type != "cuda":
        out = []
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(inputs[i % n])
            out.append(time.perf_counter() - t0)
        return out
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(repeats)]  # fmt: skip
    for i, (a, b) in enumerate(ev):
        a.record()
        fn(inputs[i % n])
        b.record()
    torch.cuda.synchronize(device)
    return [a.elapsed_time(b) / 1e3 for a, b in ev]


def time_graph_replays(fn, inputs: list, warmup: int, repeats: int, device) -> list[float]:
    """Like :func:`time_calls` on CUDA-graph replays of ``fn`` (one graph per input): the
    GPU time of a step without the launch gaps of eager mode."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # compile kernels and create handles outside the capture
        for x in inputs:
            fn(x)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graphs = []
    for x in inputs:
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            fn(x)
        graphs.append(gr)
    try:
        return time_calls(lambda gr: gr.replay(), graphs, warmup, repeats, device)
    finally:
        del graphs


def _stats(seconds: list[float], unit: float) -> dict:
    return {
        "median": statistics.median(seconds) * unit,
        "min": min(seconds) * unit,
        "max": max(seconds) * unit,
        "n": len(seconds),
    }


def _l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return 32 << 20


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- the three measurements ---------------------------------------------------------------
def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def bench_decode_cell(method: BenchMethod, shape: Shape, cfg: BenchConfig, check: bool) -> dict:
    """Time one method at one (batch, context); returns the JSON row."""
    dev = shape.device
    g = _gen(dev, cfg.seed * 1_000_003 + shape.context * 31 + shape.batch)
    first = method.build(shape, cfg, g)
    q0 = _query(shape, g)
    cache_bytes, fixed = first.tensors(), first.fixed
    # enough independent input sets that one pass over them overflows L2 twice
    per_set = cache_bytes + fixed + q0.numel() * q0.element_size()
    copies = max(1, min(_MAX_COPIES, math.ceil(2 * _l2_bytes(dev) / max(1, per_set))))
    if dev.type == "cpu":
        copies = min(copies, 2)  # CPU numbers are indicative only; keep the run short
    inputs = [(first, q0)] + [
        (method.build(shape, cfg, g), _query(shape, g)) for _ in range(copies - 1)
    ]

    def step(x):
        return method.step(*x)

    out = step(inputs[0])
    _sync(dev)
    row = {
        "method": method.name,
        "batch": shape.batch,
        "context": shape.context,
        "copies": copies,
        "cache_bytes": cache_bytes,
        "fixed_bytes": fixed,
        # per token of one sequence, all kv heads of this layer
        "bytes_per_token": cache_bytes / (shape.batch * shape.context),
        "finite": bool(torch.isfinite(out).all()),
    }
    if "clusters" in first.extra:
        row["clusters"] = int(first.extra["clusters"])
    if check and method.reference is not None:
        ref = method.reference(*inputs[0])
        row["rel_err_vs_fp32_ref"] = _rel_err(out, ref)
    row["eager_us"] = _stats(time_calls(step, inputs, cfg.warmup, cfg.repeats, dev), 1e6)
    row["graph_us"] = None
    if cfg.graphs:
        try:
            row["graph_us"] = _stats(
                time_graph_replays(step, inputs, cfg.warmup, cfg.repeats, dev), 1e6
            )
        except Exception as e:  # a step that cannot be captured is reported, not fatal
            row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    best = row["graph_us"] or row["eager_us"]
    row["us"] = best["median"]
    row["timed"] = "cuda graph replay" if row["graph_us"] else (
        "cuda events" if dev.type == "cuda" else "perf_counter")  # fmt: skip
    del inputs, first, out
    _free(dev)
    return row


def _failure(what: str, e: Exception, failed: list, log) -> None:
    """A cell that raised: record it (``results["failed"]``) and go on with the others, so
    that one method's failure (e.g. a kernel this Triton version cannot compile) does not
    lose the rest of a long GPU run."""
    msg = f"{what}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    failed.append(msg[:400])
    log(f"FAILED {msg[:400]}")


def bench_decode(cfg: BenchConfig, device: torch.device, log, failed: list) -> list[dict]:
    rows = []
    methods = [DENSE] + [METHODS[m] for m in cfg.methods]
    for batch in cfg.batches:
        for i, ctx in enumerate(cfg.contexts):
            shape = Shape(batch, ctx, cfg.heads, cfg.kv_heads, cfg.head_dim,
                          _DTYPES[cfg.dtype], device)  # fmt: skip
            dense_us = None
            for m in methods:
                try:
                    row = bench_decode_cell(m, shape, cfg, check=(i == 0))
                except Exception as e:
                    _failure(f"decode {m.name} batch {batch} context {ctx}", e, failed, log)
                    _free(device)
                    continue
                if m is DENSE:
                    dense_us = row["us"]
                row["speedup_vs_dense"] = (
                    dense_us / row["us"] if dense_us and row["us"] > 0 else None
                )
                rows.append(row)
                log(f"decode {m.name:>10} batch {batch} context {ctx:>7}: {row['us']:10.1f} us "
                    f"({row['timed']}, {row['copies']} input sets), "
                    f"{row['bytes_per_token']:.1f} B/token")  # fmt: skip
    return rows


def bench_prefill(cfg: BenchConfig, device: torch.device, log, failed: list) -> list[dict]:
    """Per context: dense causal prefill attention of one layer vs each method's
    compression work on that prefill's keys/values (batch ``cfg.prefill_batch``)."""
    rows = []
    dt = _DTYPES[cfg.dtype]
    for ctx in cfg.contexts:
        shape = Shape(cfg.prefill_batch, ctx, cfg.heads, cfg.kv_heads, cfg.head_dim, dt, device)
        g = _gen(device, cfg.seed + ctx)
        B, d = shape.batch, shape.head_dim
        q = _randn(shape, B, cfg.heads, ctx, d, g=g)
        k = _randn(shape, B, cfg.kv_heads, ctx, d, g=g)
        v = _randn(shape, B, cfg.kv_heads, ctx, d, g=g)

        def attn(x):
            torch.nn.functional.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=True)

        warm = 1 if device.type == "cuda" else 0
        t = _stats(time_calls(attn, [(q, k, v)], warm, cfg.prefill_repeats, device), 1e3)
        base = {"batch": B, "context": ctx}
        rows.append({**base, "method": "dense", "what": "causal SDPA prefill attention",
                     "ms": t["median"], "timing_ms": t, "vs_prefill_attention": 1.0})  # fmt: skip
        log(f"prefill      dense context {ctx:>7}: {t['median']:10.2f} ms attention")
        for name in cfg.methods:
            m = METHODS[name]
            if m.prefill is None:
                continue
            try:
                what, run = m.prefill(k, v, cfg, g)
                tm = _stats(
                    time_calls(lambda f: f(), [run], warm, cfg.prefill_repeats, device), 1e3
                )
            except Exception as e:
                _failure(f"prefill {name} context {ctx}", e, failed, log)
                _free(device)
                continue
            ratio = tm["median"] / t["median"] if t["median"] > 0 else None
            rows.append({**base, "method": name, "what": what, "ms": tm["median"],
                         "timing_ms": tm, "vs_prefill_attention": ratio})  # fmt: skip
            log(f"prefill {name:>10} context {ctx:>7}: {tm['median']:10.2f} ms {what}")
        del q, k, v
        _free(device)
    return rows


def _cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.untyped_storage().nbytes()
    return total


def bench_generate(cfg: BenchConfig, device: torch.device, log, failed: list) -> dict:
    """End-to-end greedy ``generate`` of ``gen_tokens`` after a ``gen_context`` prompt,
    dense (the model's SDPA and DynamicCache) and with each method installed."""
    from transformers import DynamicCache

    from .models import load_model
    from .runtime.kvs_attention import register
    from .runtime.kvs_methods import build_cache

    model, tok, info = load_model(cfg.model, dtype="auto")
    model.to(device)
    mc = model.config.get_text_config(decoder=True)
    limit = getattr(mc, "max_position_embeddings", None)
    n_new, ctx, B = cfg.gen_tokens, cfg.gen_context, cfg.gen_batch
    if limit and ctx + n_new > limit:
        raise KVSurgeryError(
            f"--gen-context {ctx} + --gen-tokens {n_new} exceeds the model's "
            f"{limit} positions; lower them."
        )
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = int(mc.vocab_size)
    ids = torch.randint(min(100, vocab // 4), vocab - 1, (B, ctx), generator=g).to(device)
    mask = torch.ones_like(ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    register()
    out = {"model": info.to_dict(), "context": ctx, "new_tokens": n_new, "batch": B, "rows": []}

    def fresh_cache(name):
        return DynamicCache() if name == "dense" else build_cache(model)

    def generate(name, x, m, n):
        cache = fresh_cache(name)
        with torch.no_grad():
            model.generate(x, attention_mask=m, past_key_values=cache, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=pad)  # fmt: skip
        return cache

    for name in ["dense", *cfg.methods]:
        m = METHODS.get(name)
        if name != "dense":
            if m.install is None:
                continue
            try:
                m.install(model, cfg, _gen(device, cfg.seed))
            except ValueError as e:  # e.g. a method this runtime does not know yet
                out.setdefault("skipped", []).append(f"{name}: {e}")
                continue
        try:
            model.set_attn_implementation("sdpa" if name == "dense" else "kvsurgery")
            # warm-up at the real length: kernels compile, OMP/k-means paths run once
            generate(name, ids, mask, 2)
            _sync(device)
            cache = fresh_cache(name)
            t0 = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                      logits_to_keep=1)  # fmt: skip
            _sync(device)
            t_prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            cache = generate(name, ids, mask, n_new)
            _sync(device)
            t_gen = time.perf_counter() - t0
            nbytes = _cache_bytes(cache)
            decode_s = t_gen - t_prefill
            row = {
                "method": name,
                "prefill_s": t_prefill,
                "generate_s": t_gen,
                "tokens_per_s": B * n_new / t_gen,
                # the first new token comes out of the prefill
                "decode_tokens_per_s": B * (n_new - 1) / decode_s
                if n_new > 1 and decode_s > 0
                else None,
                "cache_bytes": nbytes,
                "cache_bytes_per_token": nbytes / (B * (ctx + n_new)),
            }
            out["rows"].append(row)
            log(
                f"generate {name:>10}: {row['tokens_per_s']:.1f} tokens/s, prefill {t_prefill:.3f} s"
            )
            del cache
            _free(device)
        except Exception as e:  # recorded; the other methods still run
            _failure(f"generate {name}", e, failed, log)
            _free(device)
    model.set_attn_implementation("sdpa")
    return out


# -- environment --------------------------------------------------------------------------
def _versions() -> dict:
    import importlib.metadata as md

    out = {"kvsurgery": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda, "platform": platform.platform()}  # fmt: skip
    for name in ("triton", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if torch.backends.cudnn.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def _device_record(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": p.name, "sm_count": p.multi_processor_count,
                "memory_bytes": p.total_memory, "l2_bytes": _l2_bytes(device),
                "capability": f"{p.major}.{p.minor}", "cpu_numbers": False}  # fmt: skip
    return {"type": "cpu", "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "cpu_numbers": True}  # fmt: skip


# -- driver -------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig, *, out: str | None = None, plot: str | None = None,
              log=print) -> dict:  # fmt: skip
    """Run every measurement ``cfg`` asks for; returns (and with ``out`` writes) the results."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = cfg.resolve(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rec = _device_record(device)
    log(f"# kvsurgery bench -- {device_label(rec)}")
    if device.type == "cpu" and importlib.util.find_spec("triton") is not None:
        log("# (the Triton kernels run only on CUDA; on CPU each method runs its torch path)")
    results = {
        "kind": "kvsurgery-bench",
        "results_version": RESULTS_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": rec,
        "versions": _versions(),
        "settings": asdict(cfg),
        "timing": {
            "decode": (
                f"median of {cfg.repeats} after {cfg.warmup} warm-up calls; "
                + (
                    "CUDA events per call, and per CUDA-graph replay"
                    if device.type == "cuda"
                    else "time.perf_counter per call"
                )
            ),
            "prefill": f"median of {cfg.prefill_repeats}",
            "generate": "one timed run after a warm-up run",
        },  # fmt: skip
        "decode": [],
        "prefill": [],
        "generate": None,
        "skipped": [],
        "failed": [],
    }
    missing = [n for n, m in METHODS.items() if m.missing()]
    for n in missing:
        results["skipped"].append(f"{n}: {METHODS[n].missing()}")
    with torch.inference_mode():
        results["decode"] = bench_decode(cfg, device, log, results["failed"])
        if cfg.prefill:
            results["prefill"] = bench_prefill(cfg, device, log, results["failed"])
    if cfg.model:
        results["generate"] = bench_generate(cfg, device, log, results["failed"])
    else:
        results["skipped"].append("generate: no --model given")
    if out:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(p)
        log(f"# wrote {p}")
    if plot:
        made = plot_results(results, plot)
        log(f"# wrote {plot}" if made else "# --plot skipped: matplotlib is not installed")
    return results
