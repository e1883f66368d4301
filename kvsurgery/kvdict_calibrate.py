"""KV-Dict calibrator: learn per-layer dictionaries and choose per-layer sparsity.

Reads the captured keys/values of a calibration folder and writes ``kvdict/``:
``layer_XXX.safetensors`` (``dk``, ``dv`` ``(d, N)`` fp32, unit-norm atoms, and with
``query_weighting > 0`` ``kmap`` ``(H_kv, d, d)``, the map that puts keys in their queries'
metric (:func:`~kvsurgery.dictlearn.query_key_maps`; ``dk`` is learned on mapped keys);
written as each layer finishes, so an interrupted run resumes at the next layer) and
``result.json`` (per layer: chosen s_k/s_v, held-out relative error curves, for keys in the
mapped space; with ``allocation: attention`` also the attention-output error curves that
chose s, each layer's cached in ``attention_XXX.safetensors``). Maths lives in
:mod:`kvsurgery.dictlearn` and :mod:`kvsurgery.sparsity`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .capture import load_layer
from .dictlearn import learn_dictionary, query_key_maps, sparsity_curve
from .errors import KVSurgeryError
from .kernels.omp import omp, reconstruct
from .recipes import Recipe
from .runtime.kvs_cache import _FP8_MAX, int4_group
from .sparsity import choose_sparsity

SUBDIR = "kvdict"


def _split(x: torch.Tensor, holdout: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_hold = max(1, int(round(holdout * x.shape[0])))
    return x[perm[n_hold:]], x[perm[:n_hold]]


# Fields the learned dictionaries and error curves depend on; the others (the byte target,
# buffer sizes...) only change the allocation, so changing them reuses the dictionaries.
_LEARNING_FIELDS = (
    "n_atoms",
    "s_k",
    "s_v",
    "s_max",
    "iters",
    "holdout",
    "seed",
    "dense",
    "query_weighting",
)


def _mapped_keys(cap: dict, layer: int, n_kv_heads: int, alpha: float):
    """``(keys, kmap)``: the captured keys in their queries' metric, and the per-head map
    (``kmap`` None when ``alpha`` is 0)."""
    keys = cap["keys"]
    if alpha == 0:
        return keys, None
    if "queries" not in cap:
        raise KVSurgeryError(
            f"layer {layer}: the capture has no queries, which query_weighting "
            f"{alpha} needs; capture with queries (the default) or set query_weighting: 0."
        )
    kmap = query_key_maps(cap["queries"], cap["q_heads"], n_kv_heads, alpha)
    return _per_head(keys, cap["heads"].long(), kmap), kmap


def _per_head(x: torch.Tensor, heads: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``(M, d)`` times their KV head's map: ``x[m] @ maps[heads[m]]``, fp32."""
    out = torch.empty_like(x, dtype=torch.float32)
    for h in range(maps.shape[0]):
        sel = heads == h
        out[sel] = x[sel].float() @ maps[h]
    return out


def _prefix_codes(x: torch.Tensor, D: torch.Tensor, s_max: int):
    """OMP codes of ``x`` with 1..s_max atoms from one run: OMP is greedy, so the code with
    ``s`` atoms uses the first ``s`` atoms of the longest one, with least-squares
    coefficients on them. Yields ``(s, idx, coef)``."""
    G = D.T @ D
    idx = omp(x, D, s_max, gram=G)[0]
    b = (x @ D).gather(1, idx)  # (M, s_max): D^T x on the chosen atoms
    for s in range(1, s_max + 1):
        sel = idx[:, :s]
        Gs = G[sel[:, :, None], sel[:, None, :]]  # (M, s, s)
        ridge = 1e-6 * torch.eye(s, dtype=Gs.dtype)
        coef = torch.linalg.solve(Gs + ridge, b[:, :s, None]).squeeze(-1)
        yield s, sel, coef


def attention_error_curves(
    cap: dict,
    dk: torch.Tensor,
    dv: torch.Tensor,
    kmap: torch.Tensor | None,
    *,
    n_heads: int,
    n_kv_heads: int,
    s_max: int,
    sinks: int,
    buffer: int,
    coef_dtype: str = "float8_e4m3fn",
    windows: int = 4,
    queries_per_head: int = 256,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-output error of coding a layer's keys (values exact) and values (keys
    exact) with 1..s_max atoms, replayed on the capture.

    For each of the first ``windows`` captured windows and KV head, up to
    ``queries_per_head`` captured queries (of the heads that read it) attend causally over
    the captured keys and values of that window: a token at least ``buffer`` positions
    older than the query and not among the first ``sinks`` is read from its code, the rest
    exactly, as the cache reads them (codes rounded to ``coef_dtype``). The capture holds a
    random subset of each window's tokens, so this is a sampled replay; scores use
    ``head_dim ** -0.5`` (no softcap), and protected tokens are read from codes too.

    Returns:
        ``(err_k, err_v)``, ``(s_max,)`` float64 each: sum over queries of the squared
        output error over the sum of squared exact outputs, with ``s`` atoms at ``s - 1``.
    """
    if "queries" not in cap:
        raise KVSurgeryError(
            "allocation: attention replays the captured queries, and this capture has none; "
            "capture with queries (the default) or set allocation: reconstruction."
        )
    gen = torch.Generator().manual_seed(seed)
    wins = cap["samples"].unique().sort().values[:windows]
    keep = torch.isin(cap["samples"], wins)
    keys, values = cap["keys"][keep].float(), cap["values"][keep].float()
    heads, pos, win = (cap[k][keep].long() for k in ("heads", "positions", "samples"))
    d = keys.shape[1]
    mapped = keys if kmap is None else _per_head(keys, heads, kmap)
    unmap = None if kmap is None else torch.linalg.inv(kmap)
    dtype = getattr(torch, coef_dtype)

    def decoded(x, D, maps):
        out = {}
        for s, idx, coef in _prefix_codes(x, D.float(), s_max):
            if dtype == torch.float8_e4m3fn:  # rounded as the cache stores codes
                coef = coef.clamp(-_FP8_MAX, _FP8_MAX)
            r = reconstruct(idx, coef.to(dtype), D)
            out[s] = r if maps is None else _per_head(r, heads, maps)
        return out

    k_hat, v_hat = decoded(mapped, dk, unmap), decoded(values, dv, None)
    q_all, q_heads = cap["queries"].float(), cap["q_heads"].long()
    group = n_heads // n_kv_heads
    err_k = torch.zeros(s_max, dtype=torch.float64)
    err_v = torch.zeros(s_max, dtype=torch.float64)
    norm = 0.0
    for w in wins.tolist():
        for h in range(n_kv_heads):
            kv = (win == w) & (heads == h)
            qs = (
                (
                    (cap["q_samples"] == w)
                    & (q_heads // group == h)
                    & (cap["q_positions"] > sinks + buffer)
                )
                .nonzero()
                .squeeze(1)
            )
            if len(qs) == 0 or not bool(kv.any()):
                continue
            qs = qs[torch.randperm(len(qs), generator=gen)[:queries_per_head]]
            q, qp, kp = q_all[qs], cap["q_positions"][qs].long(), pos[kv]
            causal = kp[None] <= qp[:, None]
            coded = (kp[None] < qp[:, None] - buffer) & (kp[None] >= sinks)
            k, v = keys[kv], values[kv]
            scale = d**-0.5
            logits = (q @ k.T * scale).masked_fill(~causal, float("-inf"))
            p = torch.softmax(logits, -1)
            exact = p @ v
            norm += float(exact.pow(2).sum())
            for s in range(1, s_max + 1):
                lk = torch.where(coded, q @ k_hat[s][kv].T * scale, logits)
                out = torch.softmax(lk.masked_fill(~causal, float("-inf")), -1) @ v
                err_k[s - 1] += float((out - exact).pow(2).sum())
                err_v[s - 1] += float(((p * coded) @ (v_hat[s][kv] - v)).pow(2).sum())
    if norm == 0.0:
        raise KVSurgeryError(
            f"allocation: attention found no captured query past sinks + buffer "
            f"({sinks + buffer} tokens); calibrate on windows longer than that."
        )
    return err_k / norm, err_v / norm


def protect_cost(cfg, head_dim: int) -> float:
    """Bytes of a protected token over its fp16 bytes: 1; ``(d + 2) / 2d`` in int8 (an int8
    per channel and a 2-byte scale per token and kv head, for K and for V); in int4 half a
    byte per channel and a 2-byte step and minimum per group (5/16 at d = 64 or 128)."""
    d = head_dim
    if cfg.protect_dtype == "int8":
        return (d + 2) / (2 * d)
    if cfg.protect_dtype == "int4":
        try:
            group = int4_group(d)
        except ValueError as e:
            raise KVSurgeryError(f"recipe protect_dtype: {e}") from None
        return (d / 2 + 4 * d / group) / (2 * d)
    return 1.0


def _recipe_hash(recipe: Recipe) -> str:
    d = recipe.to_dict()
    learning = {k: d.get(k) for k in _LEARNING_FIELDS}
    layers = d.get("layers") or {}
    learning["layers"] = {
        sel: {k: v for k, v in over.items() if k in _LEARNING_FIELDS}
        for sel, over in layers.items()
    }
    return hashlib.sha256(json.dumps(learning, sort_keys=True).encode()).hexdigest()[:16]


def compressed_layers(dims: dict, recipe: Recipe) -> list[bool]:
    """Which layers KV-Dict compresses: full-attention layers not marked dense."""
    out = []
    for i, lt in enumerate(dims["layer_types"]):
        cfg = recipe.for_layer(i, lt)
        out.append(lt != "sliding_attention" and not cfg.dense)
    return out


def _attention_curves(calib_dir, recipe: Recipe, dims: dict, tag: str, layers, s_max, progress):
    """``(L, s_max)`` attention-error curves of keys and values for ``layers``, each cached in
    ``attention_XXX.safetensors`` under a tag of what it depends on (an interrupted run
    resumes, and a changed buffer recomputes)."""
    base = recipe.config
    what = json.dumps([tag, base.sinks, base.buffer, base.coef_dtype, s_max, base.seed])
    att_tag = hashlib.sha256(what.encode()).hexdigest()[:16]
    out_k, out_v = [], []
    for i in tqdm(layers, desc="kvdict attention", unit="layer", disable=not progress):
        path = Path(calib_dir) / SUBDIR / f"attention_{i:03d}.safetensors"
        if path.is_file():
            state = load_file(path)
            if state["tag"].numpy().tobytes().decode() == att_tag:
                out_k.append(state["k"])
                out_v.append(state["v"])
                continue
        learned = load_file(Path(calib_dir) / SUBDIR / f"layer_{i:03d}.safetensors")
        ek, ev = attention_error_curves(
            load_layer(calib_dir, i),
            learned["dk"],
            learned["dv"],
            learned.get("kmap"),
            n_heads=dims["num_heads"],
            n_kv_heads=dims["num_kv_heads"],
            s_max=s_max,
            sinks=base.sinks,
            buffer=base.buffer,
            coef_dtype=base.coef_dtype,
            seed=base.seed + i,
        )
        tag_t = torch.frombuffer(bytearray(att_tag.encode()), dtype=torch.uint8)
        tmp = path.with_suffix(".tmp")
        save_file({"k": ek, "v": ev, "tag": tag_t}, tmp)
        tmp.replace(path)
        out_k.append(ek)
        out_v.append(ev)
    return torch.stack(out_k), torch.stack(out_v)


def calibrate_kvdict(calib_dir, recipe: Recipe, dims: dict, progress: bool = True) -> dict:
    out = Path(calib_dir) / SUBDIR
    out.mkdir(exist_ok=True)
    base = recipe.config
    tag = _recipe_hash(recipe)
    which = compressed_layers(dims, recipe)
    s_max = max(base.s_max, base.s_k, base.s_v)
    # before any work: int4 needs an even head_dim (nothing to store when nothing is protected)
    kept_cost = protect_cost(base, dims["head_dim"]) if base.protect else 0.0
    curves_k, curves_v, timing = {}, {}, {}
    bar = tqdm(total=sum(which), desc="kvdict", unit="layer", disable=not progress)
    for i, on in enumerate(which):
        if not on:
            continue
        path = out / f"layer_{i:03d}.safetensors"
        if path.is_file():
            state = load_file(path)
            if state["recipe"].numpy().tobytes().decode() == tag:
                curves_k[i], curves_v[i] = state["curve_k"], state["curve_v"]
                timing[i] = float(state["seconds"][0])
                bar.update(1)
                continue
        cap = load_layer(calib_dir, i)
        cfg = recipe.for_layer(i, dims["layer_types"][i])
        t0 = time.perf_counter()
        keys, kmap = _mapped_keys(cap, i, dims["num_kv_heads"], base.query_weighting)
        tensors = {} if kmap is None else {"kmap": kmap.contiguous()}
        for name, s in (("k", cfg.s_k), ("v", cfg.s_v)):
            x = keys if name == "k" else cap["values"]
            train, held = _split(x, base.holdout, base.seed + i)
            if train.shape[0] < base.n_atoms:
                raise KVSurgeryError(
                    f"layer {i}: only {train.shape[0]} training vectors for {base.n_atoms} atoms; "
                    "capture more (--samples, --seq-len, --max-vectors) or lower n_atoms."
                )
            D, _ = learn_dictionary(train, base.n_atoms, s, iters=base.iters, seed=base.seed + i)
            tensors[f"d{name}"] = D.float().contiguous()
            tensors[f"curve_{name}"] = sparsity_curve(held, D, s_max).float()
        seconds = time.perf_counter() - t0
        tensors["seconds"] = torch.tensor([seconds])
        tensors["recipe"] = torch.frombuffer(bytearray(tag.encode()), dtype=torch.uint8)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp)
        tmp.replace(path)
        curves_k[i], curves_v[i], timing[i] = tensors["curve_k"], tensors["curve_v"], seconds
        bar.update(1)
    bar.close()

    layers = [i for i, on in enumerate(which) if on]
    if not layers:
        raise KVSurgeryError(
            "the kvdict recipe leaves no layer to compress (all dense or sliding)."
        )
    err_k = torch.stack([curves_k[i] for i in layers])
    err_v = torch.stack([curves_v[i] for i in layers])
    att = None
    allocating = base.target_ratio is not None or base.max_error is not None
    if base.allocation == "attention" and allocating:
        att = _attention_curves(calib_dir, recipe, dims, tag, layers, s_max, progress)
    if allocating:
        exact = min(1.0, (base.sinks + base.buffer) / base.target_context)
        protected = base.protect / base.target_context * kept_cost
        target = base.target_ratio
        if target is not None:
            # Uncompressed layers cost 1 each; the compressed ones share what is left.
            n_dense = len(which) - len(layers)
            target = (target * len(which) - n_dense) / len(layers)
            if target <= 0:
                raise KVSurgeryError(
                    f"target_ratio {base.target_ratio} is below what the {n_dense} uncompressed "
                    "layers alone cost; raise it or compress more layers."
                )
        s_k, s_v = choose_sparsity(
            err_k if att is None else att[0],
            err_v if att is None else att[1],
            d=dims["head_dim"],
            target_ratio=target,
            max_error=base.max_error,
            s_min=base.s_min,
            s_max=s_max,
            exact_fraction=exact,
            protected_fraction=protected,
            key_weight=base.key_weight if att is None else 1.0,
        )
    else:
        s_k = [recipe.for_layer(i, dims["layer_types"][i]).s_k for i in layers]
        s_v = [recipe.for_layer(i, dims["layer_types"][i]).s_v for i in layers]

    per_layer: list[dict | None] = [None] * len(which)
    for j, i in enumerate(layers):
        per_layer[i] = {
            "s_k": int(s_k[j]),
            "s_v": int(s_v[j]),
            "n_atoms_k": base.n_atoms,
            "n_atoms_v": base.n_atoms,
            "heldout_rel_err_k": round(float(err_k[j, s_k[j] - 1]), 5),
            "heldout_rel_err_v": round(float(err_v[j, s_v[j] - 1]), 5),
            **(
                {}
                if att is None
                else {
                    "attention_err_k": round(float(att[0][j, s_k[j] - 1]), 6),
                    "attention_err_v": round(float(att[1][j, s_v[j] - 1]), 6),
                }
            ),
            "seconds": round(timing[i], 2),
        }
    for i, on in enumerate(which):
        if not on:
            per_layer[i] = {"dense": True}
    result = {
        "recipe": recipe.to_dict(),
        "recipe_hash": tag,
        "layers": per_layer,
        "code_bytes_ratio": code_bytes_ratio(per_layer, dims["head_dim"]),
        "curves_k": {str(i): [round(float(e), 5) for e in curves_k[i]] for i in layers},
        "curves_v": {str(i): [round(float(e), 5) for e in curves_v[i]] for i in layers},
    }
    if att is not None:
        for name, a in zip(("attention_curves_k", "attention_curves_v"), att, strict=True):
            result[name] = {
                str(i): [round(float(e), 6) for e in a[j]] for j, i in enumerate(layers)
            }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    k_err = "K rel.err (query metric)" if base.query_weighting else "K rel.err"
    columns = {
        "s_k": [p.get("s_k", "-") for p in per_layer],
        "s_v": [p.get("s_v", "-") for p in per_layer],
        k_err: [p.get("heldout_rel_err_k", "-") for p in per_layer],
        "V rel.err": [p.get("heldout_rel_err_v", "-") for p in per_layer],
    }
    if att is not None:
        columns["K attn.err"] = [p.get("attention_err_k", "-") for p in per_layer]
        columns["V attn.err"] = [p.get("attention_err_v", "-") for p in per_layer]
    return {
        "manifest": {
            "dir": SUBDIR,
            "recipe_hash": tag,
            "layers": per_layer,
            "code_bytes_ratio": result["code_bytes_ratio"],
            "settings": {k: v for k, v in dataclasses.asdict(base).items() if k != "dense"},
        },
        "report": {"layers": per_layer, "columns": columns},
    }


def code_bytes_ratio(per_layer: list[dict], head_dim: int) -> float:
    """Bytes of one compressed token (int16 index + 1-byte coefficient per non-zero, K and V)
    over its fp16 bytes, averaged over all layers (dense layers count as 1)."""
    total = 0.0
    for p in per_layer:
        total += 1.0 if p.get("dense") else 3 * (p["s_k"] + p["s_v"]) / (4 * head_dim)
    return round(total / len(per_layer), 4)


# -- method interface (see calibrate.method_module) -----------------------------------------
calibrate = calibrate_kvdict


def _has_key_map(entry: dict) -> bool:
    """Whether the manifest entry's layers carry a key map (``query_weighting`` > 0)."""
    return bool(entry["settings"].get("query_weighting"))


def runtime_block(entry: dict) -> dict:
    """The method part of the ``kvsurgery`` config block from this method's manifest entry."""
    settings = entry["settings"]
    layers = [
        {"dense": True}
        if spec.get("dense")
        else {k: spec[k] for k in ("s_k", "s_v", "n_atoms_k", "n_atoms_v")}
        for spec in entry["layers"]
    ]
    return {
        "layers": layers,
        **{k: settings[k] for k in ("sinks", "buffer", "flush", "omp_tol", "coef_dtype")},
        # older calibrations have no protect setting; a block without it protects nothing,
        # and one without protect_dtype stores protected tokens in the model's dtype
        **({"protect": settings["protect"]} if settings.get("protect") else {}),
        **(
            {"protect_dtype": settings["protect_dtype"]}
            if settings.get("protect") and settings.get("protect_dtype", "model") != "model"
            else {}
        ),
        "key_map": _has_key_map(entry),
        "code_bytes_ratio": entry["code_bytes_ratio"],
    }


def load_tensors(calib_dir, entry: dict) -> dict[int, dict[str, torch.Tensor]]:
    """``{layer: {buffer name: tensor}}``: the learned dictionaries (and key maps) of every
    compressed layer."""
    key_map = _has_key_map(entry)
    out = {}
    for i, spec in enumerate(entry["layers"]):
        if spec.get("dense"):
            continue
        path = Path(calib_dir) / entry["dir"] / f"layer_{i:03d}.safetensors"
        if not path.is_file():
            raise KVSurgeryError(
                f"{path} is missing; the calibration folder is incomplete, re-run calibrate."
            )
        state = load_file(path)
        out[i] = {"kvsurgery_dk": state["dk"], "kvsurgery_dv": state["dv"]}
        if key_map:
            if "kmap" not in state:
                raise KVSurgeryError(
                    f"{path} has no key map although the recipe sets query_weighting; the "
                    "folder was changed by hand: re-run calibrate."
                )
            out[i]["kvsurgery_kmap"] = state["kmap"]
    return out
