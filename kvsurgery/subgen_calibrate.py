"""SubGen calibrator: cluster radius per layer (and kv head), samples per cluster and value
slots from captured keys, values and queries.

For each compressed layer and kv head the captured keys (positions past the sinks, in a
seeded random order) are streamed through the runtime's own clustering
(:func:`kvsurgery.kernels.subgen.append_ref`) to simulate a context of ``sim_tokens``:

* **radius**: a bisection on ``delta`` (in units of the head's median key norm) until the
  cluster count meets the memory target: the clusters a context of ``target_context``
  may hold with ``target_ratio`` of the fp16 cache, once sinks, window and value slots are
  paid, scaled to the simulated length (linearly, which errs towards more clusters than
  the sublinear growth gives);
* **cap** (``cap_clusters``, default on): at most that cluster budget per kv head at run
  time (``max_clusters``), a key beyond it joining the nearest centre, so the memory
  target holds at ``target_context`` whatever the radius, and memory stops growing after;
* **t, s** (with ``target_error``): the cheapest pair of ``t_choices x s_choices`` whose
  measured attention-output error meets the target;
* **error** at the chosen settings: mean over captured queries of
  ``|o_hat - o| / |o|``, SubGen's estimate of attention over the streamed keys against
  exact attention over the same keys (no sinks or window: the streamed part alone, the
  part SubGen approximates), averaged over two reservoir seeds.

With ``estimator: mean`` (beyond the paper) there is no radius, t or s: the cap alone
(clusters the memory target leaves, each a mean key, mean value and count) sets memory,
and the error is measured with the keys streamed through
:func:`kvsurgery.kernels.subgen.merge_append` at the cap scaled to the simulated length.

Writes ``subgen/result.json``. No tensors are learned: the settings go into the config
block, so ``load_tensors`` returns nothing. ``default_entry`` gives a training-free entry
(radius relative to the key norm, measured at runtime).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .capture import load_layer
from .errors import KVSurgeryError
from .kernels.subgen import append_ref, estimate_attention_ref, merge_append, new_state
from .recipes import Recipe

SUBDIR = "subgen"
NEEDS_QUERIES = True
_BISECT_STEPS = 12
_ERROR_SEEDS = 2
_ELEM = 2  # fp16 bytes: memory targets are stated against the fp16 cache


def _recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def compressed_layers(dims: dict, recipe: Recipe) -> list[bool]:
    """Which layers SubGen compresses: full-attention layers not marked dense."""
    return [
        lt != "sliding_attention" and not recipe.for_layer(i, lt).dense
        for i, lt in enumerate(dims["layer_types"])
    ]


# -- memory model ---------------------------------------------------------------------------


def _cluster_bytes(d: int, t: int, estimator: str) -> int:
    if estimator == "mean":
        return 2 * d * _ELEM + 4  # mean key + mean value + count
    return (t + 1) * d * _ELEM + 4  # centre + t samples + count


def head_bytes(
    d: int, sinks: int, window: int, clusters: float, t: int, s: int, estimator: str = "sampled"
) -> float:
    """Bytes of one kv head's SubGen state (fp16 tensors, int32 counts, int8 slot flags)."""
    exact = (sinks + window) * 2 * d * _ELEM
    cluster = clusters * _cluster_bytes(d, t, estimator)
    values = 0 if estimator == "mean" else s * (2 * d * _ELEM + 1)
    return exact + cluster + values


def cluster_budget(d: int, cfg) -> float:
    """Clusters per kv head the memory target leaves at ``target_context``."""
    budget = cfg.target_ratio * cfg.target_context * 2 * d * _ELEM
    rest = budget - head_bytes(d, cfg.sinks, cfg.window, 0, cfg.t, cfg.s, cfg.estimator)
    return rest / _cluster_bytes(d, cfg.t, cfg.estimator)


def _cluster_room(d: int, cfg, layer: int, fix: str) -> float:
    """:func:`cluster_budget`, or an error naming ``fix`` when it leaves less than one."""
    budget = cluster_budget(d, cfg)
    if budget < 1:
        paid = (
            "sinks and window"
            if cfg.estimator == "mean"
            else f"sinks, window and s={cfg.s} value slots"
        )
        raise KVSurgeryError(
            f"layer {layer}: target_ratio {cfg.target_ratio} leaves no room for clusters at "
            f"target_context {cfg.target_context} once {paid} are paid; {fix}."
        )
    return budget


def max_clusters(d: int, cfg, layer: int) -> int | None:
    """The runtime cap on clusters per kv head (``cap_clusters``): the cluster budget of the
    memory target, so the cache holds at most ``target_ratio`` of fp16 at ``target_context``
    and stops growing past it. None when the recipe leaves clusters unbounded."""
    if not cfg.cap_clusters:
        return None
    if cfg.estimator == "mean":
        fix = "raise target_ratio or lower window"
    else:
        fix = "raise target_ratio, lower window / s, or set cap_clusters: false"
    return math.floor(_cluster_room(d, cfg, layer, fix))


def _mean_spec(d: int, cfg, layer: int) -> dict:
    """The mean estimator's layer spec: the clusters per kv head the memory target leaves,
    ``protect`` (when the recipe asks for it) of them given to protected exact tokens
    instead (a token costs less than a cluster: no count)."""
    budget = max_clusters(d, cfg, layer)
    protect = round(cfg.protect * budget)
    spec = {"max_clusters": max(1, budget - protect)}
    return {**spec, "protect": protect} if protect else spec


def _mean_layer(i: int, k, v, q, d: int, cfg, n_stream: int, scale: float) -> dict:
    """The mean estimator's entry for layer ``i``: the cap from the memory target and the
    error measured at that cap scaled to the simulated length (same merge ratio).
    With ``protect`` the error is measured at the clusters left (:func:`_mean_spec`),
    without the protected tokens (which depend on the prompt's question)."""
    entry = _mean_spec(d, cfg, i)
    cap, protect = entry["max_clusters"], entry.get("protect", 0)
    H, n = k.shape[:2]
    sim_cap = max(1, min(n, round(cap * n / n_stream)))
    err = attention_error(k, v, q, None, 1, 0, scale, mean_cap=sim_cap, iters=cfg.kmeans_iters)
    mem = head_bytes(d, cfg.sinks, cfg.window + protect, min(cap, n_stream), 1, 0, "mean")
    return {
        **entry,
        "sim_tokens": int(n),
        "sim_clusters": [sim_cap] * H,
        "attn_rel_err": round(err, 5),
        "mem_ratio_at_target": round(min(1.0, mem / (cfg.target_context * 2 * d * _ELEM)), 4),
    }


# -- simulation -----------------------------------------------------------------------------


def _stream(k, v, delta, t, s, seed, mean_cap=None, iters=6):
    """Stream ``k, v`` ``(H, n, d)`` into a fresh state per head; returns the state. With
    ``mean_cap`` the mean estimator's clustering at that cap (``delta, t, s`` unused)."""
    H, n, d = k.shape
    if mean_cap is not None:
        state = new_state(H, min(n, mean_cap), 1, 0, d, k.dtype, k.device, "mean")
        merge_append(k, v, torch.ones(H, n, dtype=torch.bool), state, mean_cap, iters)
        return state
    state = new_state(H, n, t, s, d, k.dtype, k.device)
    g = torch.Generator().manual_seed(seed)
    ok = torch.ones(H, n, dtype=torch.bool)
    append_ref(
        k, v, ok, delta, state, torch.rand(H, n, t, generator=g), torch.rand(H, n, s, generator=g)
    )
    return state


def count_clusters(k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Clusters threshold clustering opens on ``k`` ``(H, n, d)`` with radii ``(H,)``."""
    return _stream(k, k, delta, 1, 1, 0)["n_clusters"].long()


def search_delta(
    k: torch.Tensor, target: float, per_head: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest radius (bisection in log space, per head or shared) whose cluster count is at
    most ``target`` per head. Returns ``(delta (H,), clusters (H,))``."""
    H = k.shape[0]
    scale = k.norm(dim=-1).median(dim=1).values.clamp_min(1e-6)  # (H,)
    if not per_head:
        scale = scale.mean().expand(H)
    lo = torch.full((H,), math.log(1e-3))
    hi = torch.full((H,), math.log(4.0))  # 4x the median norm: a handful of clusters
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        n = count_clusters(k, scale * mid.exp()).float()
        fits = n <= target if per_head else (n.sum() <= target * H).expand(H)
        hi = torch.where(fits, mid, hi)
        lo = torch.where(fits, lo, mid)
    delta = scale * hi.exp()
    return delta, count_clusters(k, delta)


def attention_error(k, v, q, delta, t, s, scale, seed=0, mean_cap=None, iters=6) -> float:
    """Mean relative error of SubGen's estimate of attention over ``k, v`` ``(H, n, d)`` for
    queries ``q`` ``(H, nq, d)`` (query rows of the kv head), over ``_ERROR_SEEDS`` seeds
    (one with ``mean_cap``: the mean estimator draws nothing)."""
    H, n, d = k.shape
    qf = q.float()
    exact = torch.softmax(qf @ k.float().transpose(1, 2) * scale, -1) @ v.float()  # (H, nq, d)
    none = k.new_zeros(1, H, 0, d)
    errs = []
    for r in range(1 if mean_cap is not None else _ERROR_SEEDS):
        state = _stream(k, v, delta, t, s, seed + r, mean_cap, iters)
        st = {name: x[None] for name, x in state.items()}
        est = estimate_attention_ref(qf[None], none, none, None, st, scale)[0]
        rel = (est - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-12)
        errs.append(float(rel.mean()))
    return sum(errs) / len(errs)


def _layer_vectors(cap: dict, dims: dict, cfg, seed: int):
    """Per kv head: captured keys/values past the sinks (seeded order, equal counts per
    head) and the head's queries. Returns ``(k, v (H, n, d), q (H, nq, d))``."""
    H, g = dims["num_kv_heads"], dims["num_heads"] // dims["num_kv_heads"]
    gen = torch.Generator().manual_seed(seed)
    heads, pos = cap["heads"].long(), cap["positions"].long()
    ks, qs = [], []
    for h in range(H):
        idx = ((heads == h) & (pos >= cfg.sinks)).nonzero().squeeze(1)
        ks.append(idx[torch.randperm(idx.numel(), generator=gen)])
    n = min(cfg.sim_tokens, min(x.numel() for x in ks))
    if n < 16:
        raise KVSurgeryError(
            f"only {n} captured keys per kv head past the sinks; capture more (--samples, "
            "--seq-len, --max-vectors)."
        )
    if "queries" not in cap:
        raise KVSurgeryError(
            "the capture has no queries; the SubGen calibration measures attention error on "
            "them: capture with capture_queries: true."
        )
    qh = cap["q_heads"].long() // g
    nq = None
    for h in range(H):
        idx = (qh == h).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=gen)][: cfg.eval_queries]
        qs.append(cap["queries"][idx])
        nq = idx.numel() if nq is None else min(nq, idx.numel())
    if not nq:
        raise KVSurgeryError("no captured queries for a kv head; capture more samples.")
    k = torch.stack([cap["keys"][i[:n]] for i in ks]).float()
    v = torch.stack([cap["values"][i[:n]] for i in ks]).float()
    q = torch.stack([x[:nq] for x in qs]).float()
    return k, v, q


def calibrate_subgen(calib_dir, recipe: Recipe, dims: dict, progress: bool = True) -> dict:
    out = Path(calib_dir) / SUBDIR
    out.mkdir(exist_ok=True)
    base = recipe.config
    which = compressed_layers(dims, recipe)
    if not any(which):
        raise KVSurgeryError(
            "the subgen recipe leaves no layer to compress (all dense or sliding)."
        )
    d = dims["head_dim"]
    scale = d**-0.5
    n_stream = base.target_context - base.sinks - base.window
    per_layer: list[dict] = []
    bar = tqdm(total=sum(which), desc="subgen", unit="layer", disable=not progress)
    for i, on in enumerate(which):
        if not on:
            per_layer.append({"dense": True})
            continue
        cfg = recipe.for_layer(i, dims["layer_types"][i])
        k, v, q = _layer_vectors(load_layer(calib_dir, i), dims, cfg, base.seed + i)
        if cfg.estimator == "mean":
            per_layer.append(_mean_layer(i, k, v, q, d, cfg, n_stream, scale))
            bar.update(1)
            continue
        n = k.shape[1]
        if cfg.delta is not None:
            delta = torch.full((k.shape[0],), float(cfg.delta))
            clusters = count_clusters(k, delta)
        else:
            per_target = _cluster_room(d, cfg, i, "raise target_ratio or lower window / s")
            target = max(1.0, per_target * min(1.0, n / n_stream))
            delta, clusters = search_delta(k, target, cfg.per_head)
        t, s = cfg.t, cfg.s
        err = None
        met = None
        if base.target_error is not None:
            # cheapest first: memory per head grows with clusters * t and with s
            cands = sorted(
                ((tt, ss) for tt in base.t_choices for ss in base.s_choices),
                key=lambda p: head_bytes(d, 0, 0, float(clusters.float().mean()), p[0], p[1]),
            )
            best = None
            for tt, ss in cands:
                e = attention_error(k, v, q, delta, tt, ss, scale, base.seed + i)
                if best is None or e < best[2]:
                    best = (tt, ss, e)
                if e <= base.target_error:
                    t, s, err, met = tt, ss, e, True
                    break
            else:
                t, s, err, met = best[0], best[1], best[2], False
        if err is None:
            err = attention_error(k, v, q, delta, t, s, scale, base.seed + i)
        cap = max_clusters(d, dataclasses.replace(cfg, t=t, s=s), i)
        c_target = clusters.float().mean().item() * n_stream / n  # linear extrapolation
        if cap is not None:
            c_target = min(c_target, cap)
        mem = head_bytes(d, base.sinks, base.window, c_target, t, s)
        full = base.target_context * 2 * d * _ELEM
        spec = {
            "delta": [round(float(x), 6) for x in delta]
            if cfg.per_head
            else round(float(delta[0]), 6),
            "t": int(t),
            "s": int(s),
            "sim_tokens": int(n),
            "sim_clusters": [int(c) for c in clusters],
            "attn_rel_err": round(err, 5),
            "mem_ratio_at_target": round(min(1.0, mem / full), 4),
        }
        if cap is not None:
            spec["max_clusters"] = cap
        if met is not None:
            spec["target_error_met"] = met
        per_layer.append(spec)
        bar.update(1)
    bar.close()
    result = {"recipe": recipe.to_dict(), "recipe_hash": _recipe_hash(recipe), "layers": per_layer}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    cols = (
        {}
        if base.estimator == "mean"
        else {
            "delta": [_fmt_delta(p) for p in per_layer],
            "t": [p.get("t", "-") for p in per_layer],
            "s": [p.get("s", "-") for p in per_layer],
        }
    )
    if base.protect:
        cols["protected"] = [p.get("protect", "-") for p in per_layer]
    cols |= {
        "max clusters": [p.get("max_clusters", "-") for p in per_layer],
        "clusters": [
            "-" if p.get("dense") else round(sum(p["sim_clusters"]) / len(p["sim_clusters"]), 1)
            for p in per_layer
        ],
        "attn err": [p.get("attn_rel_err", "-") for p in per_layer],
    }
    settings = {k: v for k, v in dataclasses.asdict(base).items() if k != "dense"}
    return {
        "manifest": {
            "dir": SUBDIR,
            "recipe_hash": result["recipe_hash"],
            "layers": per_layer,
            "settings": settings,
        },
        "report": {"layers": per_layer, "columns": cols},
    }


def _fmt_delta(p: dict):
    if p.get("dense"):
        return "-"
    x = p["delta"]
    return round(sum(x) / len(x), 3) if isinstance(x, list) else round(x, 3)


# -- method interface (see calibrate.method_module) -----------------------------------------
calibrate = calibrate_subgen


def runtime_block(entry: dict) -> dict:
    """The method part of the ``kvsurgery`` config block from this method's manifest entry."""
    st = entry["settings"]
    layers = [
        {"dense": True}
        if spec.get("dense")
        else {
            k: spec[k]
            for k in ("delta", "t", "s", "max_clusters", "protect")
            if spec.get(k) is not None
        }
        for spec in entry["layers"]
    ]
    block = {"layers": layers, **{k: st[k] for k in ("sinks", "window", "seed", "delta_rel")}}
    if st.get("estimator", "sampled") == "mean":  # older calibrations predate the key
        block.update(estimator="mean", kmeans_iters=st["kmeans_iters"])
        if any(spec.get("protect") for spec in layers):
            block.update(protect_window=st["protect_window"], protect_pool=st["protect_pool"])
    return block


def load_tensors(calib_dir, entry: dict) -> dict:
    """SubGen learns no tensors."""
    return {}


def default_entry(dims: dict, recipe: Recipe) -> dict:
    """A manifest entry from the recipe alone (no calibration data): the radius is
    ``delta`` when the recipe fixes one, else ``delta_rel`` times each head's median key norm,
    measured by the runtime on the first streamed keys."""
    base = recipe.config
    layers = []
    for i, on in enumerate(compressed_layers(dims, recipe)):
        if not on:
            layers.append({"dense": True})
            continue
        cfg = recipe.for_layer(i, dims["layer_types"][i])
        if cfg.estimator == "mean":
            layers.append(_mean_spec(dims["head_dim"], cfg, i))
            continue
        cap = max_clusters(dims["head_dim"], cfg, i)
        spec = {"delta": cfg.delta, "t": cfg.t, "s": cfg.s}
        if cap is not None:
            spec["max_clusters"] = cap
        layers.append(spec)
    settings = {k: v for k, v in dataclasses.asdict(base).items() if k != "dense"}
    return {"dir": None, "layers": layers, "settings": settings}


def card_sections(block: dict, info, version: str) -> tuple[str, str]:
    """Model-card text for an export: (about paragraph, settings table rows)."""
    comp = [p for p in block["layers"] if not p.get("dense")]

    def mean(key):
        vals = [x for p in comp for x in (p[key] if isinstance(p[key], list) else [p[key]])]
        return sum(vals) / max(len(vals), 1)

    if block.get("estimator") == "mean":
        about = f"""This checkpoint is `{info.base_model or info.source}` with a **SubGen**-style compressed KV
cache (streaming clustering after "SubGen: Token Generation in Sublinear Time and Memory"),
produced by kvsurgery {version}, with kvsurgery's **mean** estimator in place of the
paper's sampling. The weights are unchanged. Keys and values older than the recent window
stay exact until each kv head holds its cluster cap; then they are merged by k-means into
that many clusters, each kept as its mean key, mean value and size, and later tokens join
the nearest mean. Attention reads a cluster as one token weighted by its size: an
approximation (one specific old token cannot be recalled exactly), and memory stops
growing at the cap."""
        rows = f"""| estimator | mean (cluster means; k-means, {block.get("kmeans_iters", 6)} rounds) |
| clusters per kv head at most | {mean("max_clusters"):.0f} (mean over layers) |
| exact sinks / recent window | {block["sinks"]} / {block["window"]} tokens |"""
        if any(p.get("protect") for p in comp):
            about += f"""
Up to {mean("protect"):.0f} older tokens per sequence (mean over layers) are kept exact
instead: those the last {block.get("protect_window", 32)} prompt tokens attend to most, so a
question at the end of the prompt keeps the passage it asks about."""
            rows += f"""
| protected exact tokens per sequence | {mean("protect"):.0f} (mean over layers; chosen by the prompt's last {block.get("protect_window", 32)} queries) |"""
        return about, rows

    has_delta = all(p.get("delta") is not None for p in comp)
    radius = (
        f"{mean('delta'):.3g} (calibrated per layer / kv head)"
        if has_delta
        else (f"{block['delta_rel']} x median key norm per head (set at runtime)")
    )
    about = f"""This checkpoint is `{info.base_model or info.source}` with a **SubGen** compressed KV cache
("SubGen: Token Generation in Sublinear Time and Memory"), produced by kvsurgery {version}.
The weights are unchanged. Keys older than the recent window are merged online into
clusters of radius delta (t sampled keys each) and values into an l2-weighted reservoir;
attention over them is estimated (unbiased, not exact: one specific old token cannot be
recalled exactly). Memory grows with the number of clusters, sublinearly when keys cluster."""
    capped = all(p.get("max_clusters") is not None for p in comp)
    if capped:
        about += """
Each kv head holds at most a fixed number of clusters (below); past it a key joins the
nearest centre, so the cache stops growing and the estimates stay unbiased (noisier)."""
    cap = (
        f"{mean('max_clusters'):.0f} (mean over layers)" if capped else "none (grows with context)"
    )
    rows = f"""| mean cluster radius | {radius} |
| mean samples per cluster t / value slots s | {mean("t"):.2f} / {mean("s"):.0f} |
| clusters per kv head at most | {cap} |
| exact sinks / recent window | {block["sinks"]} / {block["window"]} tokens |"""
    return about, rows
