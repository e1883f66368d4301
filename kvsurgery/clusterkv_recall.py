"""ClusterKV calibration maths: attention mass a budgeted cluster selection captures, and
the per-layer choice of budget, tokens per cluster and dense layers (pure tensor code).

The selection is replayed exactly as the runtime (``runtime/kvs_clusterkv.py``) makes it
for a decode that starts after a prefill of ``prefill`` tokens: the keys between the sinks
and the recent window are clustered (the same k-means), a query at position ``p`` reads the
sinks and ``[prefill - window, p]`` exactly, and fills what its budget leaves after the
pending tokens ``p - prefill`` with whole clusters in descending ``max_g q_g . c`` order
(the last one truncated, members in position order; with ``spread`` the score adds the
members' key spread ``scale / 2 * q^2 . var``, as the runtime's ``spread_ranking`` does).
Recall = the share of the query's full causal softmax attention that falls on the tokens
read.
"""

from __future__ import annotations

import math

import torch

from .kernels.clusterkv import kmeans, kmeans_update


@torch.no_grad()
def selection_recall(
    keys: torch.Tensor,
    queries: torch.Tensor,
    positions: torch.Tensor,
    *,
    prefill: int,
    sinks: int,
    window: int,
    tokens_per_cluster: int,
    budgets: list[int],
    iters: int = 10,
    seed: int = 0,
    scaling: float | None = None,
    scale: float = 1.0,
    spread: bool = False,
) -> torch.Tensor:
    """Mean recall of one sequence at each budget.

    Args:
        keys: ``(H_kv, T, d)`` post-RoPE keys of one sequence (positions ``0..T-1``).
        queries: ``(H, Q, d)`` post-RoPE queries at ``positions`` ``(Q,)``, each in
            ``[prefill, T)``; ``H`` a multiple of ``H_kv`` (GQA groups are consecutive).
        prefill: tokens prefilled before decoding; ``[sinks, prefill - window)`` is clustered.
        budgets: the runtime ``budget`` values (tokens read besides sinks and window).
        scale: selected tokens are ``round((budget - pending) * scale)``: a budget meant for
            a longer context than this sequence's gets the same share of the clustered part.
        spread: rank clusters by ``q.c + scaling / 2 * sum_j q_j^2 var_j`` (``var`` the
            members' per-channel key variance) as the runtime does with ``spread_ranking``.

    Returns:
        ``(len(budgets),)`` fp32: recall averaged over queries and query heads.
    """
    H_kv, T, d = keys.shape
    H, Q, _ = queries.shape
    g = H // H_kv
    scaling = d**-0.5 if scaling is None else scaling
    k = keys.float()
    q = queries.float()
    pos = positions.long()
    t0, t1 = min(sinks, prefill), max(min(sinks, prefill), prefill - window)
    N = t1 - t0
    # full causal attention of every query (mass over all keys up to its position)
    logits = torch.einsum("hqd,htd->hqt", q, k.repeat_interleave(g, 0)) * scaling
    causal = torch.arange(T)[None, :] <= pos[:, None]  # (Q, T)
    probs = logits.masked_fill(~causal[None], float("-inf")).softmax(-1)  # (H, Q, T)
    exact_mass = probs[:, :, :t0].sum(-1) + probs[:, :, t1:].sum(-1)  # (H, Q)
    pending = (pos - prefill).clamp(min=0)  # (Q,)
    out = torch.zeros(len(budgets))
    if N == 0:
        return out + exact_mass.mean()
    C = -(-N // tokens_per_cluster)
    cent, lab = kmeans(k[:, t0:t1], C, iters, seed)  # (H_kv, C, d), (H_kv, N)
    # selection order of the clusters per (kv head, query): max score over the group
    qh = q.view(H_kv, g, Q, d)
    sc = torch.einsum("hgqd,hcd->hgqc", qh, cent)
    sizes = torch.zeros(H_kv, C, dtype=torch.long).scatter_add_(1, lab, torch.ones_like(lab))
    if spread:
        xs = k[:, t0:t1]
        var = (kmeans_update(xs * xs, lab, C)[0] - cent * cent).clamp(min=0)
        sc = sc + (0.5 * scaling) * torch.einsum("hgqd,hcd->hgqc", qh * qh, var)
    sc = sc.amax(1)  # (H_kv, Q, C)
    order = torch.sort(sc, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(2, order, torch.arange(C).expand_as(order))
    sz_ranked = sizes[:, None, :].expand(H_kv, Q, C).gather(2, order)
    start_ranked = torch.cumsum(sz_ranked, -1) - sz_ranked  # first slot of each ranked cluster
    # members keep position order inside a cluster: index of each token within its cluster
    within = torch.zeros(H_kv, N, dtype=torch.long)
    srt = torch.sort(lab, dim=-1, stable=True).indices
    first = torch.cumsum(sizes, -1) - sizes
    within.scatter_(1, srt, torch.arange(N).expand(H_kv, N) - first.gather(1, lab.gather(1, srt)))
    tok_rank = rank.gather(2, lab[:, None, :].expand(H_kv, Q, N))  # (H_kv, Q, N)
    slot = start_ranked.gather(2, tok_rank) + within[:, None, :]  # selection slot of each token
    mid = probs[:, :, t0:t1].reshape(H_kv, g, Q, N)
    by_slot = torch.zeros_like(mid).scatter_(3, slot[:, None].expand_as(mid), mid)
    cum = torch.cat([torch.zeros(H_kv, g, Q, 1), torch.cumsum(by_slot, -1)], -1)  # (.., N + 1)
    for i, b in enumerate(budgets):
        take = ((b - pending).clamp(min=0) * scale).round().long().clamp(max=N)  # (Q,)
        got = cum.gather(3, take.view(1, 1, Q, 1).expand(H_kv, g, Q, 1))[..., 0]
        out[i] = (exact_mass.view(H_kv, g, Q) + got).mean()
    return out


def allocate(
    recall: torch.Tensor, costs: torch.Tensor, total: int, unit: int
) -> tuple[list[int], float]:
    """Choose one option per layer maximising the summed recall under a total cost.

    Exact multiple-choice knapsack by dynamic programming over costs in ``unit`` steps.

    Args:
        recall: ``(L, K)`` recall of option k in layer l (``-inf`` = not allowed).
        costs: ``(K,)`` or ``(L, K)`` token cost of each option (rounded up to ``unit``).
        total: the summed cost allowed.

    Returns:
        ``(choice per layer, summed recall)``; raises ``ValueError`` when even the cheapest
        options exceed ``total``.
    """
    L, K = recall.shape
    cost = costs.expand(L, K) if costs.dim() == 1 else costs
    units = torch.ceil(cost.double() / unit).long()
    cap = int(total // unit)
    allowed = recall > -math.inf
    cheapest = int(torch.where(allowed, units, units.max() + cap + 1).min(1).values.sum())
    if cheapest > cap:
        raise ValueError(
            f"the cheapest allowed settings cost {cheapest * unit} tokens, more than the total "
            f"budget {total}"
        )
    neg = -math.inf
    best = torch.full((cap + 1,), neg, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for layer in range(L):
        nxt = torch.full_like(best, neg)
        arg = torch.full((cap + 1,), -1, dtype=torch.long)
        for k in range(K):
            u, r = int(units[layer, k]), float(recall[layer, k])
            if u > cap or r == neg:
                continue
            cand = torch.full_like(best, neg)
            cand[u:] = best[: cap + 1 - u] + r
            better = cand > nxt
            nxt = torch.where(better, cand, nxt)
            arg = torch.where(better, torch.full_like(arg, k), arg)
        best = nxt
        picks.append(arg)
    c = int(torch.argmax(best))
    value = float(best[c])
    choice = [0] * L
    for layer in range(L - 1, -1, -1):
        k = int(picks[layer][c])
        choice[layer] = k
        c -= int(units[layer, k])
    return choice, value
