"""ClusterKV calibrator: per layer, the budget share, tokens per cluster and whether the
layer stays dense, chosen to maximise the attention mass the selection captures.

From the captured post-RoPE keys and queries of whole calibration windows, every layer's
selection is replayed as the runtime makes it (a prefill of ``seq_len - append_every``
tokens, then queries at the last ``append_every`` positions; see
:mod:`kvsurgery.clusterkv_recall`) for each tokens-per-cluster choice and a grid of
budgets; the per-layer choices then maximise the summed recall under the recipe's total
budget (``budget`` tokens per layer on average at ``target_context``; a dense layer costs
``target_context``), exactly, by dynamic programming. Writes ``clusterkv/result.json``
(choices, recall curves); no tensors.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .capture import load_layer
from .clusterkv_recall import allocate, selection_recall
from .errors import KVSurgeryError
from .recipes import Recipe, _selects

SUBDIR = "clusterkv"
NEEDS_QUERIES = True  # calibrate refuses to capture without queries for this method
BUDGET_STEP = 32  # spacing of the budget grid (tokens)
SETTINGS = ("sinks", "window", "append_every", "append_clusters", "kmeans_iters", "seed")


def _pinned_tpc(recipe: Recipe, idx: int, layer_type: str) -> int | None:
    """tokens_per_cluster set for this layer by a per-layer override (then not searched)."""
    out = None
    for sel, over in recipe.layers.items():
        if "tokens_per_cluster" in over and _selects(sel, idx, layer_type):
            out = over["tokens_per_cluster"]
    return out


def _layer_plan(dims: dict, recipe: Recipe) -> list[str]:
    """Per layer: "sliding" (transformers' own layer), "dense" (forced) or "compress"."""
    plan = []
    for i, lt in enumerate(dims["layer_types"]):
        if lt == "sliding_attention":
            plan.append("sliding")
        else:
            plan.append("dense" if recipe.for_layer(i, lt).dense else "compress")
    return plan


def _sequences(cap: dict, span: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Whole windows of one layer's capture: ``[(keys (H_kv, T, d), queries (H, Q, d),
    positions (Q,))]`` with the queries at the last ``span`` positions that every head has."""
    if "samples" not in cap or "queries" not in cap:
        raise KVSurgeryError(
            "the capture has no queries or no window index (captured with queries off or by an "
            "older kvsurgery); re-run `kvsurgery calibrate` into a new folder."
        )
    T = int(cap["positions"].max()) + 1
    H_kv = int(cap["heads"].max()) + 1
    H = int(cap["q_heads"].max()) + 1
    d = cap["keys"].shape[1]
    out = []
    for s in torch.unique(cap["samples"]).tolist():
        rows = cap["samples"] == s
        if int(rows.sum()) != H_kv * T:  # the reservoir dropped some of this window's keys
            continue
        keys = torch.zeros(H_kv, T, d)
        keys[cap["heads"][rows].long(), cap["positions"][rows].long()] = cap["keys"][rows]
        qrows = (cap["q_samples"] == s) & (cap["q_positions"] >= T - span)
        qh, qp = cap["q_heads"][qrows].long(), cap["q_positions"][qrows].long() - (T - span)
        q = torch.zeros(H, span, d)
        have = torch.zeros(H, span, dtype=torch.bool)
        q[qh, qp], have[qh, qp] = cap["queries"][qrows], True
        cols = have.all(0).nonzero().squeeze(1)
        if cols.numel():
            out.append((keys, q[:, cols], cols + T - span))
    return out


def _budget_grid(cfg, n_target: int, uniform: int) -> list[int]:
    """Runtime budgets tried (tokens besides sinks and window): from ``append_every`` (so the
    pending tokens always fit) up to the whole clustered part, plus the uniform setting."""
    lo = cfg.append_every
    grid = set(range(lo, n_target + cfg.append_every, BUDGET_STEP)) | {uniform}
    return sorted(b for b in grid if b >= min(lo, uniform))


def calibrate_clusterkv(calib_dir, recipe: Recipe, dims: dict, progress: bool = True) -> dict:
    cfg = recipe.config
    out = Path(calib_dir) / SUBDIR
    out.mkdir(exist_ok=True)
    plan = _layer_plan(dims, recipe)
    full_layers = [i for i, p in enumerate(plan) if p != "sliding"]
    if not any(p == "compress" for p in plan):
        raise KVSurgeryError(
            "the clusterkv recipe leaves no layer to compress (all dense or sliding)."
        )
    exact = cfg.sinks + cfg.window
    uniform = cfg.budget - exact
    n_target = cfg.target_context - exact
    grid = _budget_grid(cfg, n_target, uniform)
    span = cfg.append_every

    curves: dict[int, dict[int, list[float]]] = {}  # layer -> tpc -> recall per grid budget
    info = {}
    bar = tqdm(total=len(full_layers), desc="clusterkv", unit="layer", disable=not progress)
    for i in full_layers:
        if plan[i] == "dense":
            bar.update(1)
            continue
        cap = load_layer(calib_dir, i)
        seqs = _sequences(cap, span)
        if not seqs:
            raise KVSurgeryError(
                f"layer {i}: no calibration window was captured whole (keys and queries); "
                "raise --max-vectors or lower --samples/--seq-len."
            )
        T = seqs[0][0].shape[1]
        prefill = T - span
        n_calib = prefill - exact
        if n_calib < 2 * max(cfg.tpc_choices + [cfg.tokens_per_cluster]):
            raise KVSurgeryError(
                f"seq_len {T} leaves {n_calib} tokens to cluster after sinks, window and the "
                f"{span} decode positions; raise --seq-len (e.g. to target_context "
                f"{cfg.target_context})."
            )
        pinned = _pinned_tpc(recipe, i, dims["layer_types"][i])
        if pinned is not None:
            choices = [pinned]
        elif cfg.calibrate:
            choices = sorted(set(cfg.tpc_choices))
        else:
            choices = [cfg.tokens_per_cluster]
        budgets = grid if cfg.calibrate else [uniform]
        curves[i] = {}
        for tpc in choices:
            rec = torch.stack(
                [
                    selection_recall(
                        keys,
                        q,
                        pos,
                        prefill=prefill,
                        sinks=cfg.sinks,
                        window=cfg.window,
                        tokens_per_cluster=tpc,
                        budgets=budgets,
                        iters=cfg.kmeans_iters,
                        seed=cfg.seed,
                        scaling=dims["head_dim"] ** -0.5,
                        scale=n_calib / n_target,
                        spread=cfg.spread_ranking,
                    )
                    for keys, q, pos in seqs
                ]
            ).mean(0)
            curves[i][tpc] = [float(r) for r in rec]
        info[i] = {"windows": len(seqs), "context": T}
        bar.update(1)
    bar.close()

    # options per layer: (budget, tpc) pairs, then dense
    per_layer: list[dict] = [{"dense": True} for _ in plan]
    if cfg.calibrate:
        options = [(b, None) for b in grid]  # tpc filled per layer: the best at that budget
        costs = torch.tensor([exact + b for b, _ in options] + [cfg.target_context])
        rows, best_tpc = [], {}
        for i in full_layers:
            if plan[i] == "dense":
                rows.append([float("-inf")] * len(options) + [1.0])
                continue
            stack = torch.tensor([curves[i][t] for t in curves[i]])  # (n_tpc, n_grid)
            r, arg = stack.max(0)
            best_tpc[i] = [list(curves[i])[int(a)] for a in arg]
            rows.append(r.tolist() + [1.0 if cfg.allow_dense else float("-inf")])
        try:
            choice, _ = allocate(torch.tensor(rows), costs, cfg.budget * len(full_layers), unit=1)
        except ValueError as e:
            raise KVSurgeryError(
                f"clusterkv budget {cfg.budget}: {e}; raise budget or keep fewer layers dense."
            ) from None
        for j, i in enumerate(full_layers):
            k = choice[j]
            if plan[i] == "dense" or k == len(options):
                per_layer[i] = {"dense": True, "recall": 1.0}
                continue
            per_layer[i] = {
                "budget": grid[k],
                "tokens_per_cluster": best_tpc[i][k],
                "recall": round(rows[j][k], 5),
                "uniform_recall": round(
                    max(curves[i][t][grid.index(uniform)] for t in curves[i]), 5
                ),
            }
    else:
        for i in full_layers:
            if plan[i] == "dense":
                per_layer[i] = {"dense": True, "recall": 1.0}
                continue
            tpc = next(iter(curves[i]))
            r = round(curves[i][tpc][0], 5)
            per_layer[i] = {
                "budget": uniform,
                "tokens_per_cluster": tpc,
                "recall": r,
                "uniform_recall": r,
            }
    for i, p in enumerate(per_layer):
        if i in info:
            p.update(info[i])
    mean_tokens = sum(
        cfg.target_context if per_layer[i].get("dense") else exact + per_layer[i]["budget"]
        for i in full_layers
    ) / len(full_layers)
    summary = {
        "mean_recall": round(
            sum(per_layer[i]["recall"] for i in full_layers) / len(full_layers), 5
        ),
        "mean_tokens_per_step": round(mean_tokens, 1),
        "dense_layers": [i for i in full_layers if per_layer[i].get("dense")],
    }
    uni = [
        per_layer[i].get("uniform_recall") for i in full_layers if "uniform_recall" in per_layer[i]
    ]
    result = {
        "recipe": recipe.to_dict(),
        "layers": per_layer,
        **summary,
        "budget_grid": grid,
        "curves": {
            str(i): {str(t): [round(x, 5) for x in c] for t, c in cs.items()}
            for i, cs in curves.items()
        },
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    columns = {
        "ckv tokens": [
            "dense" if p.get("dense") else exact + p["budget"] if "budget" in p else "-"
            for p in per_layer
        ],
        "ckv tpc": [p.get("tokens_per_cluster", "-") for p in per_layer],
        "ckv recall": [p.get("recall", "-") for p in per_layer],
        "recall@uniform": [p.get("uniform_recall", "-") for p in per_layer],
    }
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "dense"}
    entry = {"dir": SUBDIR, "layers": per_layer, **summary, "settings": settings}
    if uni:
        entry["uniform_mean_recall"] = round(sum(uni) / len(uni), 5)
    return {"manifest": entry, "report": {"layers": per_layer, "columns": columns, **summary}}


# -- method interface (see calibrate.method_module) -----------------------------------------
calibrate = calibrate_clusterkv


def default_entry(dims: dict, recipe: Recipe) -> dict:
    """A manifest entry from the recipe alone (no calibration data): every compressible
    layer gets ``budget - sinks - window`` and the recipe's tokens per cluster."""
    cfg = recipe.config
    plan = _layer_plan(dims, recipe)
    per_layer = []
    for i, p in enumerate(plan):
        if p != "compress":
            per_layer.append({"dense": True})
            continue
        tpc = _pinned_tpc(recipe, i, dims["layer_types"][i]) or cfg.tokens_per_cluster
        per_layer.append({"budget": cfg.budget - cfg.sinks - cfg.window, "tokens_per_cluster": tpc})
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "dense"}
    return {"dir": None, "layers": per_layer, "settings": settings}


def runtime_block(entry: dict) -> dict:
    """The method part of the ``kvsurgery`` config block from this method's manifest entry."""
    s = entry["settings"]
    layers = [
        {"dense": True}
        if spec.get("dense")
        else {"budget": spec["budget"], "tokens_per_cluster": spec["tokens_per_cluster"]}
        for spec in entry["layers"]
    ]
    return {
        "layers": layers,
        **{k: s[k] for k in SETTINGS},
        "offload": bool(s.get("offload", False)),
        "estimate_rest": bool(s.get("estimate_rest", False)),
        "spread_ranking": bool(s.get("spread_ranking", False)),
        "token_budget": s["budget"],
        "target_context": s["target_context"],
    }


def card_sections(block: dict, info, version: str) -> tuple[str, str]:
    """Model-card text for an exported ClusterKV checkpoint: (about, settings table rows)."""
    comp = [p for p in block["layers"] if not p.get("dense")]
    exact = block["sinks"] + block["window"]
    mean_read = sum(exact + p["budget"] for p in comp) / max(len(comp), 1)
    tpcs = sorted({p["tokens_per_cluster"] for p in comp})
    about = (
        f"This checkpoint is `{info.base_model or info.source}` with a **ClusterKV** KV cache "
        "(keys clustered by cosine k-means; each decode step attends to the sinks, the recent "
        "window and the clusters whose centroids score highest against the query, up to a "
        f"token budget), produced by kvsurgery {version}. The weights are unchanged; the "
        "checkpoint adds calibrated per-layer settings and the runtime code (Triton kernels "
        "on CUDA, torch elsewhere)."
    )
    rows = "\n".join(
        [
            f"| tokens read per step (mean over compressed layers) | {mean_read:.0f} |",
            f"| token budget (all layers, dense ones count {block['target_context']}) "
            f"| {block['token_budget']} |",
            f"| tokens per cluster | {', '.join(map(str, tpcs))} |",
            f"| exact sinks / recent window | {block['sinks']} / {block['window']} tokens |",
            f"| new clusters | {block['append_clusters']} every {block['append_every']} tokens |",
            f"| full K/V offloaded to host memory | {'yes' if block.get('offload') else 'no'} |",
            "| unread cluster members | "
            + (
                "estimated from centroid, size and mean value |"
                if block.get("estimate_rest")
                else "dropped |"
            ),
            "| cluster ranking | "
            + (
                "centroid logit + key spread along the query |"
                if block.get("spread_ranking")
                else "centroid logit |"
            ),
        ]
    )
    return about, rows


def load_tensors(calib_dir, entry: dict) -> dict:
    """ClusterKV learns settings, not tensors."""
    return {}
