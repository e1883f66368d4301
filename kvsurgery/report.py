"""Per-layer statistics of captured K/V: what the methods are tuned from (pure maths)."""

from __future__ import annotations

import torch

from .kmeans import cosine_fit, kmeans_cosine

CLUSTER_COUNTS = (16, 64, 256)
OUTLIER_RATIO = 4.0  # a channel whose mean |x| is this many times the median channel's


def _norm_stats(x: torch.Tensor) -> dict:
    n = x.float().norm(dim=-1)
    return {
        "mean": float(n.mean()),
        "std": float(n.std()) if n.numel() > 1 else 0.0,
        "max": float(n.max()),
    }


def outlier_channels(x: torch.Tensor, ratio: float = OUTLIER_RATIO, top: int = 8) -> list[dict]:
    """Channels whose mean magnitude exceeds ``ratio`` × the median channel's, largest first."""
    mag = x.float().abs().mean(0)
    med = mag.median().clamp(min=1e-12)
    r = mag / med
    idx = torch.argsort(r, descending=True)
    return [{"channel": int(i), "ratio": round(float(r[i]), 2)} for i in idx[:top] if r[i] >= ratio]


def layer_report(
    keys, values, heads, seed: int = 0, counts=CLUSTER_COUNTS, iters: int = 15
) -> dict:
    """Statistics of one layer. keys/values: ``(V, d)``; heads: ``(V,)`` KV-head of each row.

    Cluster fit is measured per KV head (ClusterKV clusters each head separately) and
    averaged over heads, weighted by their number of rows.
    """
    fits = {}
    for c in counts:
        total, weight = 0.0, 0
        for h in torch.unique(heads).tolist():
            kh = keys[heads == h]
            if kh.shape[0] < 2 * c:
                continue
            cent, lab = kmeans_cosine(kh, c, iters=iters, seed=seed)
            total += cosine_fit(kh, cent, lab) * kh.shape[0]
            weight += kh.shape[0]
        if weight:
            fits[str(c)] = round(total / weight, 4)
    return {
        "vectors": int(keys.shape[0]),
        "key_norm": _norm_stats(keys),
        "value_norm": _norm_stats(values),
        "key_outlier_channels": outlier_channels(keys),
        "value_outlier_channels": outlier_channels(values),
        "key_cluster_cosine": fits,
    }


def report_table(layers: list[dict], extra_columns: dict[str, list] | None = None) -> str:
    """A markdown table, one row per layer."""
    counts = sorted({c for r in layers for c in r["key_cluster_cosine"]}, key=int)
    extra_columns = extra_columns or {}
    head = ["layer", "vectors", "|k| mean", "|k| max", "|v| mean", "k outlier ch."]
    head += [f"k-means cos@{c}" for c in counts] + list(extra_columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(layers):
        outl = (
            ",".join(f"{o['channel']}({o['ratio']:.0f}x)" for o in r["key_outlier_channels"][:3])
            or "-"
        )
        row = [
            str(i),
            str(r["vectors"]),
            f"{r['key_norm']['mean']:.2f}",
            f"{r['key_norm']['max']:.2f}",
            f"{r['value_norm']['mean']:.2f}",
            outl,
        ]
        row += [f"{r['key_cluster_cosine'].get(c, float('nan')):.3f}" for c in counts]
        row += [str(v[i]) for v in extra_columns.values()]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
