"""SubGen kernels: streaming threshold clustering of keys, l2 value sampling, estimator attention.

Method: "SubGen: Token Generation in Sublinear Time and Memory" (also titled ClusterGen).
Per kv head the keys that leave the exact window are streamed through two structures:

* threshold clustering: a key joins the *first* centre (in creation order) within
  distance ``delta``, else it opens a new cluster whose centre is that key (centres never
  move), or, beyond the paper, joins the nearest centre when an optional cap on the
  number of clusters is reached (bounded memory; the estimates stay unbiased); each
  cluster keeps its size ``n_c`` and ``t`` reservoir slots, each slot an independent
  uniform sample of the cluster's members (slot replaced with probability ``1 / n_c``
  when a member arrives);
* an l2 value reservoir: ``s`` slots of ``(k, v)`` pairs, each slot an independent sample
  with probability proportional to ``|v|^2`` (slot replaced with probability
  ``|v_i|^2 / mu_i``, ``mu_i`` the running total of ``|v|^2`` including token i).

At decode, per query ``q`` (logits ``l(k) = scale * q.k``)::

    Z_hat = sum_c (n_c / t) sum_{slots j of c} exp(l(k_cj))           (denominator)
    N_hat = (mu / s) sum_{slots j} exp(l(rk_j)) * rv_j / |rv_j|^2        (numerator)
    out   = (N_exact + N_hat) / (Z_exact + Z_hat)

with the exact sinks and recent window in ``N_exact``/``Z_exact``, all three parts sharing
one running max. Both estimates are unbiased.

Beyond the paper, small streams are exact: a cluster keeps its first ``t`` members as its
slots (weight 1 each while ``n_c <= t``) and the value reservoir its first ``s`` tokens;
later arrivals replace slots with the paper's probabilities and the weights are adjusted
so the estimates stay unbiased (see :func:`append_ref`). With every key its own cluster
and at most ``s`` streamed tokens the output equals exact attention.

Also beyond the paper, the ``mean`` estimator (:func:`merge_append`): each cluster keeps
its mean key, mean value and size (one slot, ``t = 1``, whose value is in ``sample_v``; no
value reservoir, ``s = 0``), and the estimate reads it like one token::

    out = (N_exact + sum_c n_c exp(l(mean_k_c)) mean_v_c) / (Z_exact + sum_c n_c exp(l(mean_k_c)))

Biased (Jensen: it under-weights spread-out clusters) but deterministic and much less noisy
than sampling; the estimate kernel serves both (cluster slots with values enter the
numerator too).

Public entry points (``*_ref`` torch reference, ``*_triton`` kernel, bare name dispatches:
Triton for CUDA tensors, else the reference):

* :func:`value_accept_probs` -- running ``|v|^2`` totals and each token's replacement
  probability (shared by both paths, so they take identical decisions);
* :func:`append` -- cluster assignment + cluster and value reservoir updates, in place;
* :func:`estimate_attention` -- estimator + exact attention for any number of queries;
* :func:`merge_append` -- beyond the paper, the ``mean`` estimator's clustering (k-means
  once the cap is first reached, then nearest-mean joins): torch on every device, its
  work is a few matmuls and scatters per call.

Randomness is passed in (uniforms drawn by the caller), so the two paths take the same
decisions and a seeded caller is reproducible. This file is copied flat into exported
checkpoints: it imports only torch and (optionally) triton.
"""

from __future__ import annotations

import torch

try:  # the reference path must work where triton is absent (CPU-only installs, macOS)
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = [
    "ESTIMATORS",
    "STATE_KEYS",
    "new_state",
    "append",
    "append_ref",
    "append_triton",
    "estimate_attention",
    "estimate_attention_ref",
    "estimate_attention_triton",
    "merge_append",
    "triton_interpreter_active",
    "value_accept_probs",
]

# "sampled": the paper's estimator (threshold clusters with t key samples, l2 value
# reservoir); "mean": beyond the paper, each cluster one (mean key, mean value, count)
# triple (:func:`merge_append`).
ESTIMATORS = ("sampled", "mean")

_LOG2E = 1.4426950408889634
_NO_HIT = 2**30  # "no centre within delta" (larger than any capacity)
# Tokens compared with the existing centres at once by the reference (bounds the
# (chunk x centres) distance matrix).
_REF_CHUNK = 256

# Set by tests (under TRITON_INTERPRET=1) to route the dispatchers to the Triton kernels
# for CPU tensors too; production code never touches it.
_DISPATCH_CPU_TO_TRITON = False


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _use_triton(t: torch.Tensor) -> bool:
    return _HAS_TRITON and (t.is_cuda or _DISPATCH_CPU_TO_TRITON)


# ----------------------------------------------------------------------------------------
# shared helper
# ----------------------------------------------------------------------------------------


def value_accept_probs(
    v: torch.Tensor, valid: torch.Tensor, mu: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running ``|v|^2`` totals and each new token's l2 replacement probability.

    Args:
        v: ``(BH, M, d)`` new values.
        valid: ``(BH, M)`` bool; invalid (padding) tokens have weight 0.
        mu: ``(BH,)`` fp32 running total of ``|v|^2`` before these tokens.

    Returns:
        ``(p (BH, M), mu_run (BH, M))`` fp32: ``mu_run[i]`` includes token i and
        ``p_i = |v_i|^2 / mu_run[i]`` (0 where the total is 0). Computed once by the caller
        of both paths, so the kernel and the reference take identical decisions.
    """
    w = v.float().pow(2).sum(-1) * valid
    run = mu.float()[:, None] + torch.cumsum(w, dim=1)
    p = torch.where(run > 0, w / torch.where(run > 0, run, torch.ones_like(run)), 0.0)
    return p, run


# ----------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``|x - c|^2`` as ``|x|^2 - 2 x.c + |c|^2`` in fp32: ``(BH, m, d) x (BH, C, d) -> (BH, m, C)``
    (the kernel uses the same expansion)."""
    xf, cf = x.float(), c.float()
    return (
        xf.pow(2).sum(-1)[..., None]
        - 2 * torch.matmul(xf, cf.transpose(-1, -2))
        + cf.pow(2).sum(-1)[:, None, :]
    )


STATE_KEYS = (
    "centres",
    "counts",
    "n_clusters",
    "samples",
    "res_k",
    "res_v",
    "res_orig",
    "n_val",
    "mu",
    "mu_s",
    "sample_v",
)


def new_state(
    BH: int, cap: int, t: int, s: int, d: int, dtype, device, estimator: str = "sampled"
) -> dict:
    """An empty SubGen state for ``BH`` rows (see :func:`append_ref` for the fields).

    ``estimator="mean"`` (:func:`merge_append`): the cluster slots carry values too
    (``sample_v (BH, cap, t, d)``) and there are no fixed centres (``centres`` has no rows:
    a cluster's mean key is its centre). Otherwise (``"sampled"``, the paper's)
    ``sample_v`` has zero slots and the numerator comes from the value reservoir alone.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    mean = estimator == "mean"
    z = dict(dtype=dtype, device=device)
    return {
        "centres": torch.zeros(BH, 0 if mean else cap, d, **z),
        "counts": torch.zeros(BH, cap, dtype=torch.int32, device=device),
        "n_clusters": torch.zeros(BH, dtype=torch.int32, device=device),
        "samples": torch.zeros(BH, cap, t, d, **z),
        "res_k": torch.zeros(BH, s, d, **z),
        "res_v": torch.zeros(BH, s, d, **z),
        "res_orig": torch.zeros(BH, s, dtype=torch.int8, device=device),
        "n_val": torch.zeros(BH, dtype=torch.int32, device=device),
        "mu": torch.zeros(BH, dtype=torch.float32, device=device),
        "mu_s": torch.zeros(BH, dtype=torch.float32, device=device),
        "sample_v": torch.zeros(BH, cap, t if mean else 0, d, **z),
    }


def _cluster_limit(max_clusters, BH: int, device) -> torch.Tensor:
    """``(BH,)`` int64 cluster cap per row (``_NO_HIT`` when uncapped)."""
    if max_clusters is None:
        return torch.full((BH,), _NO_HIT, dtype=torch.int64, device=device)
    limit = torch.as_tensor(max_clusters, device=device).long().expand(BH)
    if BH and int(limit.min()) < 1:
        raise ValueError(f"max_clusters must be >= 1, got {int(limit.min())}")
    return limit


def _check_capacity(n_clusters, M: int, limit, Cap: int) -> None:
    if n_clusters.numel() and int(torch.minimum(n_clusters.long() + M, limit).max()) > Cap:
        raise ValueError(f"capacity {Cap} < clusters + new tokens; reserve before appending")


def append_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    delta: torch.Tensor,
    state: dict,
    u_clu: torch.Tensor,
    u_val: torch.Tensor,
    max_clusters: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Stream ``M`` new tokens per row into the clustering and the value reservoir (in place).

    Semantics are those of processing the valid tokens one by one, in order:

    * clustering: the token joins the first centre (lowest id) with
      ``|k - centre|^2 <= delta^2``, else opens cluster ``n_clusters`` with centre k, or,
      when the row already holds ``max_clusters`` clusters, joins the nearest centre
      (lowest id on a tie). Its cluster's count becomes ``n``. Sample slot ``j`` takes k
      when ``n <= t`` and ``j == n - 1`` (the first t members are kept exactly), or when
      ``n > t`` and ``u_clu[i, j] < 1 / n``. Slot j then holds its first member with
      probability t/n and each later member with probability 1/n, so ``(n / min(n, t))
      sum_slots`` is an unbiased estimate of the sum over members (exact while ``n <= t``).
    * values: the first ``s`` valid tokens of a row fill the slots in order (``res_orig =
      1``, ``mu_s`` = the running total when the last of them arrived); a later token
      replaces slot j when ``u_val[i, j] < |v_i|^2 / mu_i`` (``res_orig = 0``). A slot
      still holding its original token is weighted ``mu / mu_s``, a replaced one ``mu /
      (s |v|^2)``: unbiased for ``sum_i f(k_i) v_i`` (exact while at most s tokens came).

    Vectorised: existing centres are scored in chunks, tokens that match none are
    clustered among themselves leader by leader (the first unmatched token opens a cluster
    and takes every later unmatched token within delta, which is what the sequential rule
    does), and each slot keeps its last accepted token.

    Args:
        k, v: ``(BH, M, d)`` new keys / values.
        valid: ``(BH, M)`` bool; invalid tokens change nothing and get label -1.
        delta: ``(BH,)`` fp32 cluster radius per row.
        state: :data:`STATE_KEYS` tensors, updated in place: ``centres (BH, Cap, d)``,
            ``counts (BH, Cap)`` int32 (0 beyond ``n_clusters``), ``n_clusters (BH,)`` int32,
            ``samples (BH, Cap, t, d)`` (``Cap >= n_clusters + M``: room for every token to
            open a cluster), ``res_k/res_v (BH, s, d)``, ``res_orig (BH, s)`` int8, ``n_val
            (BH,)`` int32 valid tokens streamed, ``mu``/``mu_s`` ``(BH,)`` fp32.
        u_clu: ``(BH, M, t)`` and u_val ``(BH, M, s)`` uniforms in [0, 1).
        max_clusters: optional int or ``(BH,)`` ints, a cap on clusters per row (>= 1); ``Cap`` then
            only needs ``min(n_clusters + M, max_clusters)``. The cap bounds memory; the
            estimates stay unbiased (they are for any partition), only their variance grows.

    Returns:
        labels ``(BH, M)`` int64 (-1 for invalid tokens).
    """
    centres, counts, n_clusters = state["centres"], state["counts"], state["n_clusters"]
    samples, res_k, res_v = state["samples"], state["res_k"], state["res_v"]
    BH, M, d = k.shape
    Cap, t = samples.shape[1], samples.shape[2]
    S = res_k.shape[1]
    dev = k.device
    limit = _cluster_limit(max_clusters, BH, dev)
    _check_capacity(n_clusters, M, limit, Cap)
    p_val, mu_run = value_accept_probs(v, valid, state["mu"])
    rows = torch.arange(BH, device=dev)
    d2max = delta.float().pow(2)
    labels = torch.full((BH, M), -1, dtype=torch.int64, device=dev)
    cid = torch.arange(Cap, device=dev)
    slot_t = torch.arange(t, device=dev)
    for a in range(0, M, _REF_CHUNK):
        b = min(M, a + _REF_CHUNK)
        x, ok = k[:, a:b], valid[:, a:b]
        n0 = n_clusters.long().clone()
        lab = torch.full((BH, b - a), -1, dtype=torch.int64, device=dev)
        if int(n0.max()) > 0:
            c_used = int(n0.max())
            hit = _sq_dist(x, centres[:, :c_used]) <= d2max[:, None, None]
            hit &= cid[:c_used][None, None, :] < n0[:, None, None]
            first = torch.where(hit, cid[:c_used], _NO_HIT).amin(-1)
            lab = torch.where(first < _NO_HIT, first, lab)
        lab = torch.where(ok, lab, -1)
        free = ok & (lab < 0)
        n_cur = n0.clone()
        if bool(free.any()):
            # distances among the chunk's tokens once; the leader loop then only indexes
            near = _sq_dist(x, x.to(centres.dtype)) <= d2max[:, None, None]  # (BH, m, m)
            opened = []
            while True:
                has = free.any(1) & (n_cur < limit)
                if not bool(has.any()):
                    break
                lead = torch.argmax(free.to(torch.int8), dim=1)  # first unmatched token
                join = free & near[rows, lead] & has[:, None]
                join[rows, lead] |= has  # the leader joins its own cluster whatever rounding says
                lab = torch.where(join, n_cur[:, None], lab)
                opened.append((rows[has], n_cur[has], lead[has]))
                n_cur = n_cur + has.long()
                free &= ~join
            if opened:
                r, c, j = (torch.cat(z) for z in zip(*opened, strict=True))
                centres[r, c] = x[r, j].to(centres.dtype)
            if bool(free.any()):
                # rows at their cap: every leader came earlier, so every centre exists and
                # none is within delta: the token joins the nearest one
                c_used = int(n_cur.max())
                d2 = _sq_dist(x, centres[:, :c_used])
                d2 = torch.where(cid[:c_used][None, None, :] < n_cur[:, None, None], d2, torch.inf)
                lab = torch.where(free, d2.argmin(-1), lab)
        n_clusters.copy_(n_cur.to(n_clusters.dtype))
        labels[:, a:b] = lab
        # member ranks: the i-th member of cluster c in this chunk has count n0_c + i
        safe = lab.clamp(min=0)
        key = torch.where(ok, lab, Cap)  # invalid tokens sort last, in a group of their own
        order = torch.argsort(key, dim=1, stable=True)
        sk = key.gather(1, order)
        pos = torch.arange(b - a, device=dev).expand_as(sk)
        starts = torch.ones_like(sk, dtype=torch.bool)
        starts[:, 1:] = sk[:, 1:] != sk[:, :-1]
        first = torch.where(starts, pos, 0).cummax(1).values
        rank = torch.empty_like(sk).scatter_(1, order, pos - first + 1)
        n = (counts.long().gather(1, safe) + rank)[..., None]  # (BH, m, 1)
        counts.scatter_add_(1, safe, ok.to(counts.dtype))
        acc = torch.where(n <= t, slot_t == n - 1, u_clu[:, a:b] < 1.0 / n.float().clamp(min=1))
        acc &= ok[..., None]
        tok = torch.arange(a, b, device=dev)[None, :, None].expand(BH, b - a, t)
        last = torch.full((BH, Cap * t), -1, dtype=torch.int64, device=dev)
        flat = (safe[..., None] * t + slot_t).reshape(BH, -1)
        last.scatter_reduce_(1, flat, torch.where(acc, tok, -1).reshape(BH, -1), "amax")
        put = last >= 0
        src = k[rows[:, None].expand_as(last), last.clamp(min=0)]  # (BH, Cap*t, d)
        smp = samples.view(BH, Cap * t, d)
        smp.copy_(torch.where(put[..., None], src.to(samples.dtype), smp))
    # value reservoir: deterministic fill, then l2 replacement; each slot keeps its last take
    rank_v = state["n_val"].long()[:, None] + torch.cumsum(valid.long(), dim=1) - 1  # (BH, M)
    det = valid & (rank_v < S)
    slot_s = torch.arange(S, device=dev)
    acc = torch.where(det[..., None], slot_s == rank_v[..., None], u_val < p_val[..., None])
    acc &= valid[..., None]  # (BH, M, S)
    tok = torch.arange(M, device=dev)[None, :, None]
    last = torch.where(acc, tok, -1).amax(1) if M else torch.full((BH, S), -1, device=dev)
    put = last >= 0
    idx = last.clamp(min=0)
    res_k.copy_(torch.where(put[..., None], k[rows[:, None], idx].to(res_k.dtype), res_k))
    res_v.copy_(torch.where(put[..., None], v[rows[:, None], idx].to(res_v.dtype), res_v))
    orig = det.gather(1, idx).to(torch.int8)
    state["res_orig"].copy_(torch.where(put, orig, state["res_orig"]))
    last_det = torch.where(det, torch.arange(M, device=dev), -1).amax(1) if M else None
    if M:
        mu_at = mu_run.gather(1, last_det.clamp(min=0)[:, None])[:, 0]
        state["mu_s"].copy_(torch.where(last_det >= 0, mu_at, state["mu_s"]))
        state["mu"].copy_(mu_run[:, -1])
    state["n_val"] += valid.sum(1).to(state["n_val"].dtype)
    return labels


def _lloyd(pts, w, init, iters: int):
    """Weighted Lloyd k-means of ``pts (P, d)`` (fp32, weights ``w (P,)``) from centres
    ``init (C, d)``: ``iters`` (at least 1) rounds of nearest-centre assignment (lowest id
    on a tie) and weighted-mean update; a centre left without members stays where it is.
    Returns ``(labels (P,) int64, centres (C, d))`` of the last round: each centre with
    members is the weighted mean of them."""
    cent = init.clone()
    for _ in range(max(1, iters)):
        lab = _sq_dist(pts[None], cent[None])[0].argmin(-1)
        wsum = torch.zeros(cent.shape[0], device=pts.device).index_add_(0, lab, w)
        sums = torch.zeros_like(cent).index_add_(0, lab, pts * w[:, None])
        cent = torch.where(wsum[:, None] > 0, sums / wsum.clamp(min=1e-30)[:, None], cent)
    return lab, cent


def merge_append(
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    state: dict,
    max_clusters: int | torch.Tensor,
    iters: int = 6,
) -> torch.Tensor:
    """Stream ``M`` new tokens per row into mean clusters (the ``mean`` estimator), in place.

    Beyond the paper: each cluster keeps the mean key and mean value of its members and
    their count (``t = 1`` slot, ``sample_v`` holding the mean value, no value reservoir),
    and attention reads a cluster as one token of logit ``l(mean key) + log(count)``
    carrying the mean value. Deterministic (no draws). Per row, with ``n`` clusters and
    ``L = max_clusters``:

    * while the valid new tokens fit (``n + m <= L``) each opens a cluster of its own, in
      order: short streams are exact;
    * the call that first overflows (``n < L < n + m``, usually the prompt's) runs a
      weighted k-means over the existing clusters (weight = count) and the new tokens
      into ``L`` clusters: centres start at the existing means and ``L - n`` evenly spaced
      new tokens, then ``iters`` Lloyd rounds (L2, lowest id on a tie);
    * once full (``n == L``) each new token joins the nearest mean key as it was at the
      start of the call, and the means and counts absorb the call's tokens.

    Means are kept in the state dtype, updated in fp32 (in bf16 a mean stops moving once a
    member's pull, ``|x - mean| / n``, falls below its rounding step). Returns labels ``(BH, M)`` int64
    (-1 for invalid tokens). State fields (:func:`new_state` with ``estimator="mean"``):
    ``samples (BH, Cap, 1, d)`` mean keys,
    ``sample_v (BH, Cap, 1, d)`` mean values, ``counts (BH, Cap)``, ``n_clusters (BH,)``
    (``Cap >= min(n_clusters + M, max_clusters)``); the others are left alone.
    """
    mk, mv = state["samples"], state["sample_v"]
    counts, n_clusters = state["counts"], state["n_clusters"]
    if mk.shape[2] != 1 or mv.shape[2] != 1:
        raise ValueError("the mean estimator keeps one key and one value slot per cluster (t = 1)")
    BH, M, d = k.shape
    Cap = mk.shape[1]
    dev = k.device
    limit = _cluster_limit(max_clusters, BH, dev)
    _check_capacity(n_clusters, M, limit, Cap)
    labels = torch.full((BH, M), -1, dtype=torch.int64, device=dev)
    if BH == 0 or M == 0:
        return labels
    n0 = n_clusters.long()
    m = valid.long().sum(1)
    room = limit - n0
    rank = torch.cumsum(valid.long(), 1) - 1
    cid = torch.arange(Cap, device=dev)
    # rows whose tokens all fit: each opens its own cluster
    fit = valid & (m <= room)[:, None]
    labels = torch.where(fit, n0[:, None] + rank, labels)
    if bool(fit.any()):
        r, j = fit.nonzero(as_tuple=True)
        c = labels[r, j]
        mk[r, c, 0] = k[r, j].to(mk.dtype)
        mv[r, c, 0] = v[r, j].to(mv.dtype)
        counts[r, c] = 1
    # full rows: nearest mean key as of the start of the call, then running means
    join = valid & ((room <= 0) & (m > 0))[:, None]
    if bool(join.any()):
        c_used = int(n0.max())
        d2 = _sq_dist(k, mk[:, :c_used, 0])
        d2 = torch.where(cid[:c_used][None, None, :] < n0[:, None, None], d2, torch.inf)
        labels = torch.where(join, d2.argmin(-1), labels)
        lab = torch.where(join, labels, Cap)  # Cap: a scratch column for the other tokens
        add = torch.zeros(BH, Cap + 1, dtype=torch.float32, device=dev)
        add.scatter_add_(1, lab, join.float())
        old = counts.float()
        new = old + add[:, :Cap]
        hit = (add[:, :Cap] > 0)[..., None]
        inv = 1.0 / new.clamp(min=1)[..., None]
        idx = lab[..., None].expand(BH, M, d)
        for means, x in ((mk, k), (mv, v)):  # mean keys, then mean values
            sums = torch.zeros(BH, Cap + 1, d, dtype=torch.float32, device=dev)
            sums.scatter_add_(1, idx, x.float() * join[..., None])
            cur = means[:, :, 0].float()
            upd = (cur * old[..., None] + sums[:, :Cap]) * inv
            means[:, :, 0] = torch.where(hit, upd, cur).to(means.dtype)
        counts.copy_(new.round().to(counts.dtype))
    # rows overflowing for the first time: weighted k-means, one row at a time (once per row)
    for r in ((room > 0) & (m > room)).nonzero().flatten().tolist():
        n, L = int(n0[r]), int(limit[r])
        tok = valid[r].nonzero().flatten()
        w = torch.cat([counts[r, :n].float(), torch.ones(len(tok), device=dev)])
        pk = torch.cat([mk[r, :n, 0].float(), k[r, tok].float()])
        pv = torch.cat([mv[r, :n, 0].float(), v[r, tok].float()])
        pick = n + torch.div(
            torch.arange(L - n, device=dev) * len(tok), L - n, rounding_mode="floor"
        )
        lab, ck = _lloyd(pk, w, pk[torch.cat([torch.arange(n, device=dev), pick])], iters)
        wsum = torch.zeros(L, device=dev).index_add_(0, lab, w)
        cv = torch.zeros(L, d, device=dev).index_add_(0, lab, pv * w[:, None])
        # an empty cluster keeps its centre (a later token may join it), count and value 0
        mk[r, :L, 0] = ck.to(mk.dtype)
        mv[r, :L, 0] = (cv / wsum.clamp(min=1e-30)[:, None]).to(mv.dtype)
        counts[r, :L] = wsum.round().to(counts.dtype)
        labels[r, tok] = lab[n:]
        n_clusters[r] = L
    n_clusters.copy_(torch.where(fit.any(1), n0 + m, n_clusters.long()).to(n_clusters.dtype))
    return labels


def _slot_weights(res_v, res_orig, mu, mu_s) -> torch.Tensor:
    """Numerator weight of each value slot: ``mu / mu_s`` for a slot still holding its
    original token, ``mu / (s |v|^2)`` for a replaced one, 0 for an unused slot.
    ``(..., s, d), (..., s), (...), (...) -> (..., s)`` fp32."""
    S = res_v.shape[-2]
    nrm = res_v.float().pow(2).sum(-1)
    mu, mu_s = mu.float()[..., None], mu_s.float()[..., None]
    orig = res_orig != 0
    w_orig = torch.where(mu_s > 0, mu / torch.where(mu_s > 0, mu_s, 1.0), 1.0)
    live = (nrm > 0) & (mu > 0)
    w_rep = torch.where(live, mu / (S * torch.where(live, nrm, 1.0)), 0.0)
    return torch.where(orig, w_orig.expand_as(nrm), w_rep)


def estimate_attention_ref(
    q: torch.Tensor,
    k_ex: torch.Tensor,
    v_ex: torch.Tensor,
    mask_ex: torch.Tensor | None,
    state: dict,
    scale: float,
) -> torch.Tensor:
    """Exact attention over ``k_ex/v_ex`` plus the SubGen estimate of the streamed tokens.

    Args:
        q: ``(B, H, Q, d)`` queries (GQA: query head h reads kv head ``h // (H / H_kv)``).
        k_ex, v_ex: ``(B, H_kv, E, d)`` exact tokens (sinks, window, current).
        mask_ex: ``(B, Q, E)`` bool, True = attend (None: all). The streamed tokens are
            visible to every query (they are older than all of them and padding never
            enters the streams).
        state: the :data:`STATE_KEYS` tensors with a ``(B, H_kv)`` row shape: ``samples (B,
            H_kv, C, t, d)``, ``counts (B, H_kv, C)``, ``res_k/res_v (B, H_kv, s, d)``,
            ``res_orig (B, H_kv, s)``, ``mu``/``mu_s`` ``(B, H_kv)``, and ``sample_v (B, H_kv, C,
            t or 0, d)``: with t slots the cluster samples enter the numerator too (the
            ``mean`` estimator, whose ``s`` is 0); the others are unused.
        scale: softmax scale.

    Returns:
        ``(B, H, Q, d)`` in q's dtype, computed in fp32; a query that sees nothing gets 0.
    """
    B, H, Q, d = q.shape
    H_kv = k_ex.shape[1]
    g = H // H_kv
    samples, counts = state["samples"], state["counts"]
    C, t = samples.shape[2], samples.shape[3]
    qg = q.float().reshape(B, H_kv, g * Q, d)
    s_ex = torch.matmul(qg, k_ex.float().transpose(-1, -2)) * scale  # (B, H_kv, gQ, E)
    if mask_ex is not None:
        m = mask_ex[:, None, None].expand(B, 1, g, Q, -1).reshape(B, 1, g * Q, -1)
        s_ex = s_ex.masked_fill(~m, float("-inf"))
    smp = samples.float().reshape(B, H_kv, C * t, d)
    s_sm = torch.matmul(qg, smp.transpose(-1, -2)) * scale  # (B, H_kv, gQ, C*t)
    n_c = counts.float()[..., None]  # (B, H_kv, C, 1)
    filled = torch.arange(t, device=q.device) < n_c.clamp(max=t)  # (B, H_kv, C, t)
    w_sm = torch.where(filled, n_c / n_c.clamp(min=1, max=t), 0.0).reshape(B, H_kv, C * t)
    s_sm = s_sm.masked_fill(~(w_sm > 0)[:, :, None], float("-inf"))
    rv = state["res_v"].float()
    w_rv = _slot_weights(rv, state["res_orig"], state["mu"], state["mu_s"])  # (B, H_kv, S)
    s_rv = torch.matmul(qg, state["res_k"].float().transpose(-1, -2)) * scale
    s_rv = s_rv.masked_fill(~(w_rv > 0)[:, :, None], float("-inf"))
    mx = torch.cat([s_ex, s_sm, s_rv], dim=-1).amax(-1, keepdim=True)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    p_ex, p_sm, p_rv = (torch.exp(x - mx) for x in (s_ex, s_sm, s_rv))
    den = p_ex.sum(-1) + (p_sm * w_sm[:, :, None]).sum(-1)
    num = torch.matmul(p_ex, v_ex.float()) + torch.matmul(p_rv * w_rv[:, :, None], rv)
    sv = state.get("sample_v")
    if sv is not None and sv.shape[-2] > 0:  # cluster slots carry values (mean estimator)
        num = num + torch.matmul(p_sm * w_sm[:, :, None], sv.float().reshape(B, H_kv, C * t, d))
    out = num * torch.where(den > 0, 1.0 / torch.where(den > 0, den, 1.0), 0.0)[..., None]
    return out.reshape(B, H, Q, d).to(q.dtype)


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

if _HAS_TRITON:
    # Lengths and counts change with every call (M tokens per append, C with each new
    # cluster, E with the window): specialising on them would recompile mid-generation.
    _NO_HIT_TL = tl.constexpr(_NO_HIT)  # jit code may only read constexpr globals

    @triton.jit(do_not_specialize=["M", "Cap"])
    def _subgen_append_kernel(
        k_ptr,
        v_ptr,
        ok_ptr,
        delta_ptr,
        cen_ptr,
        cnt_ptr,
        ncl_ptr,
        max_ptr,
        smp_ptr,
        rk_ptr,
        rv_ptr,
        orig_ptr,
        nval_ptr,
        mus_ptr,
        uc_ptr,
        pv_ptr,
        run_ptr,
        uv_ptr,
        lab_ptr,
        M,
        Cap,
        T: tl.constexpr,  # samples per cluster
        T_P: tl.constexpr,  # next pow2 of T (tile dimension)
        S: tl.constexpr,  # value slots
        S_P: tl.constexpr,  # next pow2 of S (tile dimension)
        D: tl.constexpr,  # head dim: constexpr so the d-mask folds away when D == D_P
        D_P: tl.constexpr,  # next pow2 of D (tile dimension)
        BLOCK_C: tl.constexpr,  # centres scored per step (tile dimension)
    ):
        """Grid ``(BH,)``: one program streams the M tokens of its row in order (the
        clustering is sequential: a token may join a cluster the previous one opened).
        Per token: squared distances to every centre in tiles, first hit within delta or
        a new cluster, count += 1, sample and value slot updates (rules in
        :func:`append_ref`). State lives in global memory; a barrier after each token makes
        its stores visible to the next token's loads across the program's threads.
        Interpreter quirk: a vector mask may not be and-ed with a scalar bool, so scalar
        flags are int32 and broadcast by comparing a vector with them."""
        row = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, D_P)
        dmask = offs_d < D
        offs_t = tl.arange(0, T_P)
        offs_s = tl.arange(0, S_P)
        d2max = tl.load(delta_ptr + row)
        d2max = d2max * d2max
        ncl = tl.load(ncl_ptr + row)
        ncl_max = tl.load(max_ptr + row)
        nval = tl.load(nval_ptr + row)
        mus = tl.load(mus_ptr + row)
        for i in range(0, M):
            tok = row * M + i
            act = (tl.load(ok_ptr + tok) != 0).to(tl.int32)
            kx = tl.load(k_ptr + tok * D + offs_d, mask=dmask, other=0.0)
            x = kx.to(tl.float32)
            xx = tl.sum(x * x, axis=0)
            best = tl.full([], _NO_HIT_TL, tl.int32)
            near = tl.full([], 0, tl.int32)  # nearest centre, for a row at its cap
            near_d2 = tl.full([], float("inf"), tl.float32)
            for c0 in range(0, ncl, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                cmask = offs_c < ncl
                c = tl.load(
                    cen_ptr + (row * Cap + offs_c[:, None]) * D + offs_d[None, :],
                    mask=cmask[:, None] & dmask[None, :],
                    other=0.0,
                ).to(tl.float32)
                d2 = xx - 2.0 * tl.sum(c * x[None, :], axis=1) + tl.sum(c * c, axis=1)
                hit = cmask & (d2 <= d2max)
                best = tl.minimum(best, tl.min(tl.where(hit, offs_c, _NO_HIT_TL), axis=0))
                d2c = tl.where(cmask, d2, float("inf"))
                tile_min = tl.min(d2c, axis=0)
                tile_arg = tl.min(tl.where(d2c == tile_min, offs_c, _NO_HIT_TL), axis=0)
                closer = tile_min < near_d2  # strict: an earlier tile wins a tie
                near = tl.where(closer, tile_arg, near)
                near_d2 = tl.where(closer, tile_min, near_d2)
            full = ncl >= ncl_max
            lab = tl.where(best == _NO_HIT_TL, tl.where(full, near, ncl), best)
            opened = ((best == _NO_HIT_TL) & (ncl < ncl_max)).to(tl.int32) * act
            tl.store(
                cen_ptr + (row * Cap + lab) * D + offs_d,
                kx.to(cen_ptr.dtype.element_ty),
                mask=dmask & (offs_d * 0 + opened != 0),
            )
            n = tl.load(cnt_ptr + row * Cap + lab) + 1
            tl.store(cnt_ptr + row * Cap + lab, n, mask=act != 0)
            ncl = ncl + opened
            # sample slots: the first T members exactly, then replacement with prob 1/n
            small = (n <= T).to(tl.int32)
            u = tl.load(uc_ptr + tok * T + offs_t, mask=offs_t < T, other=1.0)
            take = ((offs_t == n - 1) & (offs_t * 0 + small != 0)) | (
                (u < 1.0 / n.to(tl.float32)) & (offs_t * 0 + small == 0)
            )
            take = take & (offs_t < T) & (offs_t * 0 + act != 0)
            tl.store(
                smp_ptr + ((row * Cap + lab) * T + offs_t[:, None]) * D + offs_d[None, :],
                (tl.zeros([T_P, D_P], tl.float32) + x[None, :]).to(smp_ptr.dtype.element_ty),
                mask=take[:, None] & dmask[None, :],
            )
            # value slots: the first S valid tokens in order, then l2 replacement
            det = (nval < S).to(tl.int32) * act
            rep = act - det
            p = tl.load(pv_ptr + tok)
            uv = tl.load(uv_ptr + tok * S + offs_s, mask=offs_s < S, other=1.0)
            take_v = ((offs_s == nval) & (offs_s * 0 + det != 0)) | (
                (uv < p) & (offs_s * 0 + rep != 0)
            )
            take_v = take_v & (offs_s < S)
            vx = tl.load(v_ptr + tok * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
            slot = (row * S + offs_s[:, None]) * D + offs_d[None, :]
            zero = tl.zeros([S_P, D_P], tl.float32)
            m2 = take_v[:, None] & dmask[None, :]
            tl.store(rk_ptr + slot, (zero + x[None, :]).to(rk_ptr.dtype.element_ty), mask=m2)
            tl.store(rv_ptr + slot, (zero + vx[None, :]).to(rv_ptr.dtype.element_ty), mask=m2)
            tl.store(
                orig_ptr + row * S + offs_s,
                (offs_s * 0 + det).to(tl.int8),
                mask=take_v,
            )
            mus = tl.where(det != 0, tl.load(run_ptr + tok), mus)
            nval = nval + act
            tl.store(lab_ptr + tok, tl.where(act != 0, lab, -1).to(tl.int64))
            tl.debug_barrier()
        tl.store(ncl_ptr + row, ncl)
        tl.store(nval_ptr + row, nval)
        tl.store(mus_ptr + row, mus)

    @triton.jit
    def _online(
        m, lsum, acc, s, w, vv, HAS_V: tl.constexpr, IN_DEN: tl.constexpr, PREC: tl.constexpr
    ):
        """One tile of the shared online softmax (base 2): logits ``s (R, N)`` (-inf =
        absent), per-column weights ``w (N,)``, values ``vv (N, D_P)``. ``IN_DEN``: the
        weighted terms enter the denominator; ``HAS_V``: they enter the numerator."""
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # shift by 0 while nothing is attended yet, so exp2 never sees -inf - -inf
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None]) * w[None, :]
        if IN_DEN:
            lsum = lsum * alpha + tl.sum(p, axis=1)
        else:
            lsum = lsum * alpha
        if HAS_V:
            acc = acc * alpha[:, None] + tl.dot(p, vv, input_precision=PREC)
        else:
            acc = acc * alpha[:, None]
        return m_new, lsum, acc

    @triton.jit(do_not_specialize=["Q", "E", "C", "H_kv"])
    def _subgen_attn_kernel(
        q_ptr,
        stride_qb,
        stride_qh,
        stride_qq,
        ke_ptr,
        stride_kb,
        stride_kh,
        stride_kt,
        ve_ptr,
        stride_vb,
        stride_vh,
        stride_vt,
        mask_ptr,
        stride_mb,
        stride_mq,
        smp_ptr,
        smpv_ptr,
        cnt_ptr,
        rk_ptr,
        rv_ptr,
        orig_ptr,
        mu_ptr,
        mus_ptr,
        out_ptr,
        H_kv,
        Q,
        E,
        C,
        scale_log2e,
        G: tl.constexpr,  # query heads per kv head (row -> head arithmetic folds)
        T: tl.constexpr,  # samples per cluster (sample -> cluster division folds)
        S: tl.constexpr,  # value slots
        SMP_V: tl.constexpr,  # cluster slots carry values (numerator too)
        HAS_MASK: tl.constexpr,  # no mask: skip its loads entirely
        D: tl.constexpr,  # head dim
        D_P: tl.constexpr,  # next pow2 of D (tile dimension)
        BLOCK_R: tl.constexpr,  # query rows (group heads x queries) per program
        BLOCK_N: tl.constexpr,  # tokens / samples / slots per tile
        PREC: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 inputs, else "tf32"
    ):
        """Grid ``(cdiv(G*Q, BLOCK_R), B*H_kv)``. Rows ``r = gi*Q + qi`` are the group's
        query heads x queries, so each K/V row is read once for the whole group (no GQA
        copy). Three passes share one online softmax: exact tokens (masked per query),
        cluster samples (denominator, and numerator too with ``SMP_V``; weight ``n_c /
        min(n_c, t)`` on the filled slots), value slots (numerator only, weights of
        :func:`_slot_weights`). Writes ``out (B, H, Q, D)`` fp32."""
        pid_r = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        b = pid_bh // H_kv
        h = pid_bh % H_kv
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = offs_r < G * Q
        gi = offs_r // Q
        qi = offs_r % Q
        offs_d = tl.arange(0, D_P)
        dmask = offs_d < D
        qrow = b * stride_qb + (h * G + gi) * stride_qh + qi * stride_qq
        qv = tl.load(
            q_ptr + qrow[:, None] + offs_d[None, :],
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        ).to(tl.float32)
        qv = qv * scale_log2e
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        lsum = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, D_P], tl.float32)
        ones = tl.full([BLOCK_N], 1.0, tl.float32)
        # exact tokens
        for n0 in range(0, E, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < E
            m2 = nmask[:, None] & dmask[None, :]
            kk = tl.load(
                ke_ptr
                + b * stride_kb
                + h * stride_kh
                + offs_n[:, None] * stride_kt
                + offs_d[None, :],
                mask=m2,
                other=0.0,
            ).to(tl.float32)
            vv = tl.load(
                ve_ptr
                + b * stride_vb
                + h * stride_vh
                + offs_n[:, None] * stride_vt
                + offs_d[None, :],
                mask=m2,
                other=0.0,
            ).to(tl.float32)
            s = tl.dot(qv, tl.trans(kk), input_precision=PREC)  # (BLOCK_R, BLOCK_N)
            live = rmask[:, None] & nmask[None, :]
            if HAS_MASK:
                mk = tl.load(
                    mask_ptr + b * stride_mb + qi[:, None] * stride_mq + offs_n[None, :],
                    mask=live,
                    other=0,
                )
                live = live & (mk != 0)
            s = tl.where(live, s, float("-inf"))
            m, lsum, acc = _online(m, lsum, acc, s, ones, vv, True, True, PREC)
        # cluster samples: denominator only
        for n0 in range(0, C * T, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < C * T
            kk = tl.load(
                smp_ptr + (pid_bh * C * T + offs_n[:, None]) * D + offs_d[None, :],
                mask=nmask[:, None] & dmask[None, :],
                other=0.0,
            ).to(tl.float32)
            n_c = tl.load(cnt_ptr + pid_bh * C + offs_n // T, mask=nmask, other=0)
            n_c = n_c.to(tl.float32)
            n_f = tl.minimum(n_c, T)  # filled slots
            w = tl.where((offs_n % T).to(tl.float32) < n_f, n_c / tl.maximum(n_f, 1.0), 0.0)
            s = tl.dot(qv, tl.trans(kk), input_precision=PREC)
            s = tl.where(rmask[:, None] & (w > 0)[None, :], s, float("-inf"))
            if SMP_V:
                vv = tl.load(
                    smpv_ptr + (pid_bh * C * T + offs_n[:, None]) * D + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :],
                    other=0.0,
                ).to(tl.float32)
                m, lsum, acc = _online(m, lsum, acc, s, w, vv, True, True, PREC)
            else:
                m, lsum, acc = _online(m, lsum, acc, s, w, kk, False, True, PREC)
        # value slots: numerator only
        mu = tl.load(mu_ptr + pid_bh)
        mu_s = tl.load(mus_ptr + pid_bh)
        w_orig = tl.where(mu_s > 0, mu / tl.where(mu_s > 0, mu_s, 1.0), 1.0)
        for n0 in range(0, S, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < S
            m2 = nmask[:, None] & dmask[None, :]
            kk = tl.load(
                rk_ptr + (pid_bh * S + offs_n[:, None]) * D + offs_d[None, :], mask=m2, other=0.0
            ).to(tl.float32)
            vv = tl.load(
                rv_ptr + (pid_bh * S + offs_n[:, None]) * D + offs_d[None, :], mask=m2, other=0.0
            ).to(tl.float32)
            orig = tl.load(orig_ptr + pid_bh * S + offs_n, mask=nmask, other=0) != 0
            nrm = tl.sum(vv * vv, axis=1)
            live = nmask & (nrm > 0) & (nrm * 0.0 + mu > 0)  # vector-wide test (interpreter)
            w_rep = tl.where(live, mu / (S * tl.where(live, nrm, 1.0)), 0.0)
            w = tl.where(orig & nmask, nrm * 0.0 + w_orig, w_rep)
            s = tl.dot(qv, tl.trans(kk), input_precision=PREC)
            s = tl.where(rmask[:, None] & (w > 0)[None, :], s, float("-inf"))
            m, lsum, acc = _online(m, lsum, acc, s, w, vv, True, False, PREC)
        inv = tl.where(lsum > 0, 1.0 / tl.where(lsum > 0, lsum, 1.0), 0.0)
        orow = ((b * H_kv + h) * G + gi) * Q + qi
        tl.store(
            out_ptr + orow[:, None] * D + offs_d[None, :],
            acc * inv[:, None],
            mask=rmask[:, None] & dmask[None, :],
        )


def triton_interpreter_active() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1
    was set before triton was first imported)."""
    if not _HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_subgen_attn_kernel, InterpretedFunction) and isinstance(
        tl.sum, InterpretedFunction
    )


def _check_runnable(t: torch.Tensor) -> None:
    # triton.jit binds to the interpreter at decoration time: CPU tensors can only run
    # when TRITON_INTERPRET=1 preceded the first triton import
    if not _HAS_TRITON:
        raise RuntimeError("triton is not available; use the *_ref functions")
    if not t.is_cuda and not triton_interpreter_active():
        raise RuntimeError(
            "subgen Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton "
            "is first imported; use the *_ref functions instead"
        )


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------


def append_triton(k, v, valid, delta, state: dict, u_clu, u_val, max_clusters=None):
    """:func:`append_ref` as one sequential Triton program per row (same arguments; the
    state tensors must be contiguous, they are updated in place)."""
    _check_runnable(k)
    BH, M, d = k.shape
    Cap, t = state["samples"].shape[1], state["samples"].shape[2]
    S = state["res_k"].shape[1]
    for name in STATE_KEYS:
        if not state[name].is_contiguous():
            raise ValueError(f"state[{name!r}] must be contiguous (updated in place)")
    limit = _cluster_limit(max_clusters, BH, k.device)
    _check_capacity(state["n_clusters"], M, limit, Cap)
    labels = torch.empty(BH, M, dtype=torch.int64, device=k.device)
    if BH == 0 or M == 0:
        return labels
    p_val, mu_run = value_accept_probs(v, valid, state["mu"])
    _subgen_append_kernel[(BH,)](
        k.contiguous(),
        v.contiguous(),
        valid.to(torch.int8).contiguous(),
        delta.float().contiguous(),
        *(state[n] for n in STATE_KEYS[:3]),  # centres, counts, n_clusters
        limit.clamp(max=_NO_HIT).to(torch.int32).contiguous(),
        *(state[n] for n in STATE_KEYS[3:7]),  # samples .. res_orig
        state["n_val"],
        state["mu_s"],
        u_clu.float().contiguous(),
        p_val.contiguous(),
        mu_run.contiguous(),
        u_val.float().contiguous(),
        labels,
        M,
        Cap,
        T=t,
        T_P=_next_pow2(max(t, 2)),
        S=S,
        S_P=_next_pow2(max(S, 2)),
        D=d,
        D_P=_next_pow2(max(d, 16)),
        BLOCK_C=32,
        num_warps=4,
    )
    state["mu"].copy_(mu_run[:, -1])
    return labels


def estimate_attention_triton(q, k_ex, v_ex, mask_ex, state: dict, scale: float) -> torch.Tensor:
    """:func:`estimate_attention_ref` as one Triton kernel (same arguments)."""
    _check_runnable(q)
    B, H, Q, d = q.shape
    H_kv, E = k_ex.shape[1], k_ex.shape[2]
    g = H // H_kv
    C, t = state["samples"].shape[2], state["samples"].shape[3]
    S = state["res_k"].shape[2]
    sv = state.get("sample_v")
    has_sv = sv is not None and sv.shape[-2] > 0
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_ex = k_ex if k_ex.stride(-1) == 1 else k_ex.contiguous()
    v_ex = v_ex if v_ex.stride(-1) == 1 else v_ex.contiguous()
    out = torch.empty(B, H, Q, d, dtype=torch.float32, device=q.device)
    if mask_ex is not None:
        mk = mask_ex.to(torch.int8).contiguous()
        m_args = (mk, mk.stride(0), mk.stride(1))
    else:
        m_args = (q, 0, 0)  # never read
    BLOCK_R = 16
    _subgen_attn_kernel[(triton.cdiv(g * Q, BLOCK_R), B * H_kv)](
        q,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_ex,
        k_ex.stride(0),
        k_ex.stride(1),
        k_ex.stride(2),
        v_ex,
        v_ex.stride(0),
        v_ex.stride(1),
        v_ex.stride(2),
        *m_args,
        state["samples"].contiguous(),
        sv.contiguous() if has_sv else q,  # never read without SMP_V
        state["counts"].to(torch.int32).contiguous(),
        # no value slots (mean estimator): never read, and an empty tensor's null pointer
        # is not handed to the launcher
        *(
            (
                state["res_k"].contiguous(),
                state["res_v"].contiguous(),
                state["res_orig"].to(torch.int8).contiguous(),
            )
            if S
            else (q, q, q)
        ),
        state["mu"].float().contiguous(),
        state["mu_s"].float().contiguous(),
        out,
        H_kv,
        Q,
        E,
        C,
        float(scale) * _LOG2E,
        G=g,
        T=t,
        S=S,
        SMP_V=has_sv,
        HAS_MASK=mask_ex is not None,
        D=d,
        D_P=_next_pow2(max(d, 16)),
        BLOCK_R=BLOCK_R,
        BLOCK_N=16,
        # fp32 inputs keep fp32 products (the tensor cores' default tf32 would cost ~1e-3)
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------
# dispatchers
# ----------------------------------------------------------------------------------------


def append(k, v, valid, delta, state: dict, u_clu, u_val, max_clusters=None) -> torch.Tensor:
    """Stream tokens into the SubGen state (see :func:`append_ref`): Triton on CUDA, else torch."""
    fn = append_triton if _use_triton(k) else append_ref
    return fn(k, v, valid, delta, state, u_clu, u_val, max_clusters)


def estimate_attention(q, k_ex, v_ex, mask_ex, state: dict, scale: float) -> torch.Tensor:
    """SubGen decode attention (see :func:`estimate_attention_ref`): Triton on CUDA, else torch."""
    fn = estimate_attention_triton if _use_triton(q) else estimate_attention_ref
    return fn(q, k_ex, v_ex, mask_ex, state, scale)
