"""Spherical k-means (cosine assignment, mean centroids) — pure torch reference.

ClusterKV clusters keys this way at prefill; calibration uses it to measure how well a
layer's keys cluster.
"""

from __future__ import annotations

import torch


def kmeans_cosine(
    x: torch.Tensor, n_clusters: int, iters: int = 20, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster rows of ``x`` ``(n, d)`` by cosine similarity.

    Assignment is by cosine to the normalised centroids; a centroid is the mean of its raw
    members (as in ClusterKV). Empty clusters are re-seeded with the worst-fitting points.
    Returns ``(centroids (C, d) float32, labels (n,) int64)``. Deterministic for a seed.
    """
    n = x.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in 1..{n} (number of points), got {n_clusters}")
    x = x.float()
    xn = torch.nn.functional.normalize(x, dim=-1)
    g = torch.Generator().manual_seed(seed)
    cent = x[torch.randperm(n, generator=g)[:n_clusters]].clone()
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = xn @ torch.nn.functional.normalize(cent, dim=-1).T
        best, labels = sim.max(dim=1)
        counts = torch.bincount(labels, minlength=n_clusters)
        sums = torch.zeros_like(cent).index_add_(0, labels, x)
        empty = counts == 0
        cent = torch.where(empty[:, None], cent, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            worst = torch.argsort(best)[: int(empty.sum())]
            cent[empty] = x[worst]
    return cent, labels


def cosine_fit(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cosine similarity of each point to its centroid (1 = perfectly clustered)."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    cn = torch.nn.functional.normalize(centroids.float(), dim=-1)
    return float((xn * cn[labels]).sum(-1).mean())
