"""ClusterKV kernels: spherical k-means on keys, cluster selection, sparse decode attention.

Method: "ClusterKV: Manipulating LLM KV Cache in Semantic Space for Recallable
Compression". Per kv head the cached keys are clustered by cosine similarity (a centroid
is the mean of its raw member keys); at each decode step every centroid is scored by its
raw inner product with the query, whole clusters are taken in descending score order
until a token budget is filled, and attention runs exactly over the selected tokens plus
the tokens that are always kept (sinks, recent window, current token).

Public entry points (each ``*_ref`` is the torch reference, ``*_triton`` the kernel with
the same semantics, the bare name a dispatcher: Triton for CUDA tensors, else reference):

* :func:`kmeans_assign` -- cosine assignment of points to centroids (fused, no M x C
  matrix in the kernel);
* :func:`kmeans_update` -- mean of the raw members of each cluster, and the counts;
* :func:`kmeans` -- batched spherical k-means ``(BH, M, d) -> (BH, C, d), (BH, M)``;
* :func:`select_clusters` -- whole clusters by descending score until a budget is
  filled, expanded to positions in the label-sorted token order;
* :func:`sparse_attention` -- single-query GQA attention over an index list.

This file is copied flat into exported checkpoints: it imports only torch, the standard
library and (optionally) triton.
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
    "kmeans",
    "kmeans_assign",
    "kmeans_assign_ref",
    "kmeans_assign_triton",
    "kmeans_update",
    "kmeans_update_ref",
    "kmeans_update_triton",
    "select_clusters",
    "select_clusters_ref",
    "select_clusters_triton",
    "sparse_attention",
    "sparse_attention_ref",
    "sparse_attention_triton",
    "triton_interpreter_active",
]

_LOG2E = 1.4426950408889634
_NORM_EPS = 1e-12

# Set by tests (under TRITON_INTERPRET=1) to route the dispatchers to the Triton kernels
# for CPU tensors too; production code never touches it.
_DISPATCH_CPU_TO_TRITON = False


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _last_dim_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _batched(x: torch.Tensor, dims: int) -> tuple[torch.Tensor, bool]:
    """Add a leading batch dimension when ``x`` has ``dims - 1`` dimensions."""
    if x.dim() == dims - 1:
        return x.unsqueeze(0), True
    if x.dim() != dims:
        raise ValueError(f"expected a {dims - 1}-D or {dims}-D tensor, got shape {tuple(x.shape)}")
    return x, False


def _use_triton(t: torch.Tensor) -> bool:
    return _HAS_TRITON and (t.is_cuda or _DISPATCH_CPU_TO_TRITON)


# ----------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------


def kmeans_assign_ref(
    x: torch.Tensor, centroids: torch.Tensor, return_scores: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cosine assignment: ``labels[m] = argmax_c <x[m], c / |c|>``.

    ``x / |x|`` is a positive factor per row, so it does not change the argmax and is not
    applied. Ties go to the lower centroid id; a zero centroid scores 0.

    Args:
        x: ``(M, d)`` or ``(BH, M, d)`` points (any float dtype; computed in fp32).
        centroids: ``(C, d)`` or ``(BH, C, d)``.
        return_scores: also return the best score ``<x[m], c_best / |c_best|>`` (fp32).

    Returns:
        labels ``(M,)`` / ``(BH, M)`` int64 [, scores of the same shape].
    """
    xb, squeeze = _batched(x, 3)
    cb, _ = _batched(centroids, 3)
    cn = torch.nn.functional.normalize(cb.float(), dim=-1, eps=_NORM_EPS)
    sim = torch.matmul(xb.float(), cn.transpose(-1, -2))  # (BH, M, C)
    best = sim.amax(dim=-1)
    labels = torch.argmax(sim, dim=-1)  # documented: index of the first maximal value
    if squeeze:
        labels, best = labels[0], best[0]
    return (labels, best) if return_scores else labels


def kmeans_update_ref(
    x: torch.Tensor, labels: torch.Tensor, n_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid = mean of the raw member points; an empty cluster gets a zero centroid.

    Args:
        x: ``(M, d)`` or ``(BH, M, d)``.
        labels: ``(M,)`` / ``(BH, M)`` int in ``[0, n_clusters)``.
        n_clusters: C.

    Returns:
        ``(centroids (C, d) / (BH, C, d) fp32, counts (C,) / (BH, C) int64)``.
    """
    xb, squeeze = _batched(x, 3)
    lb, _ = _batched(labels, 2)
    BH, M, d = xb.shape
    C = int(n_clusters)
    flat = (lb.long() + torch.arange(BH, device=xb.device)[:, None] * C).reshape(-1)
    sums = torch.zeros(BH * C, d, dtype=torch.float32, device=xb.device)
    sums.index_add_(0, flat, xb.reshape(-1, d).float())
    counts = torch.bincount(flat, minlength=BH * C).view(BH, C)
    cent = sums.view(BH, C, d) / counts.clamp(min=1)[..., None]
    if squeeze:
        return cent[0], counts[0]
    return cent, counts


def _nan_to_neg_inf(scores: torch.Tensor) -> torch.Tensor:
    # not torch.nan_to_num: that would also turn -inf into the finite float min
    s = scores.float()
    return torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)


def _exclusive_cumsum(sizes: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(sizes.long(), dim=-1) - sizes.long()


def select_clusters_ref(
    scores: torch.Tensor,
    sizes: torch.Tensor,
    budget: int,
    offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole clusters by descending score until ``budget`` tokens, the last one truncated.

    Order: score descending; equal scores (``-inf`` included) go lower cluster id first;
    NaN scores are read as ``-inf``. This is an exact ordering (a stable sort), not an
    approximate top-k.

    Args:
        scores: ``(BH, C)`` float.
        sizes: ``(BH, C)`` int, tokens per cluster (0 allowed).
        budget: tokens to select per row.
        offsets: ``(BH, C)`` int, start of each cluster in the label-sorted token order;
            None = exclusive prefix sums of ``sizes`` (clusters stored back to back).

    Returns:
        ``(index (BH, budget) int64, n_valid (BH,) int64)``: positions in the label-sorted
        order, cluster by cluster in selection order, members in stored order;
        ``n_valid = min(budget, sum(sizes))``; entries from ``n_valid`` on are 0.
    """
    BH, C = scores.shape
    budget = int(budget)
    dev = scores.device
    if offsets is None:
        offsets = _exclusive_cumsum(sizes)
    if C == 0 or budget == 0:
        z = torch.zeros(BH, budget, dtype=torch.int64, device=dev)
        return z, torch.zeros(BH, dtype=torch.int64, device=dev)
    s = _nan_to_neg_inf(scores)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # (BH, C)
    sz = sizes.long().gather(1, order)
    cum = torch.cumsum(sz, dim=-1)  # tokens up to and including each ranked cluster
    start = cum - sz
    p = torch.arange(budget, device=dev).expand(BH, budget).contiguous()
    r = torch.searchsorted(cum, p, right=True).clamp(max=C - 1)  # first rank with cum > p
    cl = order.gather(1, r)
    idx = offsets.long().gather(1, cl) + p - start.gather(1, r)
    n_valid = cum[:, -1].clamp(max=budget)
    idx = torch.where(p < n_valid[:, None], idx, torch.zeros_like(idx))
    return idx, n_valid


def sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    n_valid: torch.Tensor,
    scale: float,
    return_lse: bool = False,
):
    """Single-query attention over the tokens ``index[b, h, :n_valid[b, h]]`` of kv head h.

    Args:
        q: ``(B, H, 1, d)``.
        k, v: ``(B, H_kv, T, d)`` (views with any strides are fine).
        index: ``(B, H_kv, n_sel)`` int token positions into T; entries from ``n_valid`` on
            are ignored (may hold anything in ``[0, T)``).
        n_valid: ``(B, H_kv)`` int, ``<= n_sel``.
        scale: softmax scale.

    Returns:
        ``(B, H, 1, d)`` in q's dtype, computed in fp32; a row with ``n_valid == 0`` is 0.
        With ``return_lse`` also ``(B, H)`` fp32, the log of the softmax denominator
        (natural log of ``sum exp(scale * q.k)``; ``-inf`` for an empty row), so that the
        result can be merged with attention over further (pseudo-)tokens.
    """
    B, H, Q, d = q.shape
    if Q != 1:
        raise ValueError(f"sparse_attention is single-query; got Q={Q}")
    H_kv, n_sel = k.shape[1], index.shape[2]
    if H % H_kv:
        raise ValueError(f"H={H} is not a multiple of H_kv={H_kv}")
    g = H // H_kv
    ii = index.long().clamp(0, max(0, k.shape[2] - 1))[..., None].expand(B, H_kv, n_sel, d)
    kk = k.gather(2, ii).float()  # (B, H_kv, n_sel, d)
    vv = v.gather(2, ii).float()
    qg = q.float().reshape(B, H_kv, g, d)
    s = torch.matmul(qg, kk.transpose(-1, -2)) * scale  # (B, H_kv, g, n_sel)
    live = torch.arange(n_sel, device=q.device) < n_valid.to(q.device)[..., None]
    s = s.masked_fill(~live[:, :, None, :], float("-inf"))
    mx = s.amax(-1, keepdim=True) if n_sel else s.new_zeros(B, H_kv, g, 1)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    p = torch.exp(s - mx)
    den = p.sum(-1, keepdim=True)
    p = p * torch.where(den > 0, 1.0 / den, torch.zeros_like(den))
    out = torch.matmul(p, vv)  # (B, H_kv, g, d)
    out = out.reshape(B, H, 1, d).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(den > 0, mx + torch.log(den), torch.full_like(den, float("-inf")))
    return out, lse.reshape(B, H)


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

if _HAS_TRITON:
    # Counts and lengths change with every call (M with the context, C with each append,
    # n_valid per step): specialising on them (== 1, % 16) would recompile mid-generation.

    @triton.jit(do_not_specialize=["M", "C"])
    def _kmeans_assign_kernel(
        x_ptr,
        stride_xb,
        stride_xm,
        c_ptr,
        stride_cb,
        stride_cc,
        lab_ptr,
        best_ptr,
        M,
        C,
        D: tl.constexpr,  # head dim: constexpr so the d-mask folds away when D == D_P
        D_P: tl.constexpr,  # next pow2 of D, >= 16 (tile dimension of tl.dot)
        BLOCK_M: tl.constexpr,  # points per program (tile dimension, >= 16 for tl.dot)
        BLOCK_C: tl.constexpr,  # centroids per tile (tile dimension, >= 16 for tl.dot)
    ):
        """Grid ``(cdiv(M, BLOCK_M), BH)``. Reads points ``(BH, M, D)`` and unit-norm
        centroids ``(BH, C, D)`` fp32; writes ``labels (BH, M)`` int64 and the best score
        ``(BH, M)`` fp32. The M x C similarity only ever exists one (BLOCK_M, BLOCK_C) tile
        at a time, folded into a running (max, argmax)."""
        pid_m = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = offs_m < M
        offs_d = tl.arange(0, D_P)
        dmask = offs_d < D
        x = tl.load(
            x_ptr + pid_b * stride_xb + offs_m[:, None] * stride_xm + offs_d[None, :],
            mask=mmask[:, None] & dmask[None, :],
            other=0.0,
        ).to(tl.float32)
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        arg = tl.zeros([BLOCK_M], tl.int32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            cmask = offs_c < C
            cn = tl.load(
                c_ptr + pid_b * stride_cb + offs_c[:, None] * stride_cc + offs_d[None, :],
                mask=cmask[:, None] & dmask[None, :],
                other=0.0,
            )
            # ieee: tf32 would flip near-tied assignments relative to the fp32 reference
            s = tl.dot(x, tl.trans(cn), input_precision="ieee")  # (BLOCK_M, BLOCK_C)
            s = tl.where(cmask[None, :], s, float("-inf"))
            t_best = tl.max(s, axis=1)
            t_arg = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int32) + c0
            upd = t_best > best  # strict: on a tie the earlier tile (lower id) keeps it
            best = tl.where(upd, t_best, best)
            arg = tl.where(upd, t_arg, arg)
        out = pid_b * M + offs_m
        tl.store(lab_ptr + out, arg.to(tl.int64), mask=mmask)
        tl.store(best_ptr + out, best, mask=mmask)

    @triton.jit(do_not_specialize=["M", "C"])
    def _kmeans_update_kernel(
        x_ptr,
        stride_xb,
        stride_xm,
        order_ptr,
        start_ptr,
        cent_ptr,
        M,
        C,
        D: tl.constexpr,  # head dim (see the assign kernel)
        D_P: tl.constexpr,  # next pow2 of D (tile dimension)
        BLOCK_M: tl.constexpr,  # member rows per tile (tile dimension)
    ):
        """Grid ``(C, BH)``. ``order (BH, M)`` lists the points sorted by label and
        ``start (BH, C + 1)`` where each cluster's run begins; program (c, bh) sums its run
        in a fixed order (deterministic, no atomics) and writes the mean to
        ``cent (BH, C, D)`` fp32 (zeros for an empty cluster)."""
        pid_c = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        s0 = tl.load(start_ptr + pid_b * (C + 1) + pid_c)
        s1 = tl.load(start_ptr + pid_b * (C + 1) + pid_c + 1)
        offs_d = tl.arange(0, D_P)
        dmask = offs_d < D
        acc = tl.zeros([BLOCK_M, D_P], tl.float32)
        for i0 in range(s0, s1, BLOCK_M):
            offs_i = i0 + tl.arange(0, BLOCK_M)
            imask = offs_i < s1
            row = tl.load(order_ptr + pid_b * M + offs_i, mask=imask, other=0)
            acc += tl.load(
                x_ptr + pid_b * stride_xb + row[:, None] * stride_xm + offs_d[None, :],
                mask=imask[:, None] & dmask[None, :],
                other=0.0,
            ).to(tl.float32)
        n = (s1 - s0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / tl.maximum(n, 1.0)
        tl.store(cent_ptr + (pid_b * C + pid_c) * D + offs_d, mean, mask=dmask)

    @triton.jit(do_not_specialize=["C"])
    def _cluster_rank_kernel(
        score_ptr,
        size_ptr,
        start_ptr,
        C,
        BLOCK_C: tl.constexpr,  # clusters ranked per program (tile dimension)
        BLOCK_O: tl.constexpr,  # clusters compared per step (tile dimension)
    ):
        """Grid ``(cdiv(C, BLOCK_C), BH)``. For each cluster c writes ``start[bh, c]`` =
        tokens of the clusters ranked before it (score higher, or equal with a lower id).
        All-pairs comparison in tiles: exact, no sort, any C."""
        pid_c = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        s_c = tl.load(score_ptr + pid_b * C + offs_c, mask=cmask, other=float("-inf"))
        before = tl.zeros([BLOCK_C], tl.int64)
        for o0 in range(0, C, BLOCK_O):
            offs_o = o0 + tl.arange(0, BLOCK_O)
            omask = offs_o < C
            s_o = tl.load(score_ptr + pid_b * C + offs_o, mask=omask, other=float("-inf"))
            z_o = tl.load(size_ptr + pid_b * C + offs_o, mask=omask, other=0).to(tl.int64)
            ahead = (s_o[None, :] > s_c[:, None]) | (
                (s_o[None, :] == s_c[:, None]) & (offs_o[None, :] < offs_c[:, None])
            )
            before += tl.sum(tl.where(ahead & omask[None, :], z_o[None, :], 0), axis=1)
        tl.store(start_ptr + pid_b * C + offs_c, before, mask=cmask)

    @triton.jit(do_not_specialize=["C", "budget"])
    def _cluster_expand_kernel(
        start_ptr,
        size_ptr,
        off_ptr,
        idx_ptr,
        C,
        budget,
        BLOCK_P: tl.constexpr,  # output positions per program (tile dimension)
        BLOCK_C: tl.constexpr,  # clusters scanned per step (tile dimension)
    ):
        """Grid ``(cdiv(budget, BLOCK_P), BH)``. Output position p belongs to the cluster
        whose ranked run ``[start, start + size)`` holds it (the runs of non-empty clusters
        partition ``[0, total)``); writes ``offset + p - start`` there, 0 past the total."""
        pid_p = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = offs_p < budget
        pp = offs_p.to(tl.int64)
        out = tl.zeros([BLOCK_P], tl.int64)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            cmask = offs_c < C
            st = tl.load(start_ptr + pid_b * C + offs_c, mask=cmask, other=0)
            z = tl.load(size_ptr + pid_b * C + offs_c, mask=cmask, other=0).to(tl.int64)
            off = tl.load(off_ptr + pid_b * C + offs_c, mask=cmask, other=0).to(tl.int64)
            hit = (pp[:, None] >= st[None, :]) & (pp[:, None] < st[None, :] + z[None, :])
            hit = hit & cmask[None, :]
            out += tl.sum(tl.where(hit, off[None, :] + pp[:, None] - st[None, :], 0), axis=1)
        tl.store(idx_ptr + pid_b * budget + offs_p, out, mask=pmask)

    @triton.jit(do_not_specialize=["n_sel", "split_len", "n_splits"])
    def _sparse_attn_split_kernel(
        q_ptr,
        k_ptr,
        stride_kb,
        stride_kh,
        stride_kt,
        v_ptr,
        stride_vb,
        stride_vh,
        stride_vt,
        idx_ptr,
        stride_ib,
        stride_ih,
        nv_ptr,
        m_ptr,
        l_ptr,
        o_ptr,
        H_kv,
        n_sel,
        split_len,
        n_splits,
        scale_log2e,
        G_P: tl.constexpr,  # query heads per kv head, padded to pow2 (tile dimension)
        D: tl.constexpr,  # head dim: constexpr so the d-mask folds away when D == D_P
        D_P: tl.constexpr,  # next pow2 of D (tile dimension)
        BLOCK_N: tl.constexpr,  # indices per tile (tile dimension)
    ):
        """Grid ``(n_splits, B*H_kv)``. Split s covers list positions
        ``[s*split_len, min((s+1)*split_len, n_valid))`` of its kv head; the G_P query heads
        of the group are the rows of one tile, so each gathered K/V row is loaded once for
        the whole group. Online softmax in base 2; writes ``m, l (B*H_kv, n_splits, G_P)``
        and the unnormalised ``o (B*H_kv, n_splits, G_P, D)``."""
        pid_s = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        b = pid_bh // H_kv
        h = pid_bh % H_kv
        offs_g = tl.arange(0, G_P)
        offs_d = tl.arange(0, D_P)
        dmask = offs_d < D
        nv = tl.load(nv_ptr + pid_bh)
        n_end = tl.minimum(nv, n_sel)
        start = pid_s * split_len
        end = tl.minimum(start + split_len, n_end)
        qv = tl.load(
            q_ptr + (pid_bh * G_P + offs_g[:, None]) * D + offs_d[None, :],
            mask=dmask[None, :],
            other=0.0,
        )
        qv = qv * scale_log2e
        m = tl.full([G_P], float("-inf"), tl.float32)
        lsum = tl.zeros([G_P], tl.float32)
        acc = tl.zeros([G_P, D_P], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            t = tl.load(idx_ptr + b * stride_ib + h * stride_ih + offs_n, mask=nmask, other=0)
            t = t.to(tl.int64)
            m2 = nmask[:, None] & dmask[None, :]
            kk = tl.load(
                k_ptr + b * stride_kb + h * stride_kh + t[:, None] * stride_kt + offs_d[None, :],
                mask=m2,
                other=0.0,
            ).to(tl.float32)
            s = tl.sum(qv[:, None, :] * kk[None, :, :], axis=2)  # (G_P, BLOCK_N)
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            # shift by 0 while nothing is attended yet, so exp2 never sees -inf - -inf
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_use)
            p = tl.exp2(s - m_use[:, None])
            lsum = lsum * alpha + tl.sum(p, axis=1)
            vv = tl.load(
                v_ptr + b * stride_vb + h * stride_vh + t[:, None] * stride_vt + offs_d[None, :],
                mask=m2,
                other=0.0,
            ).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vv[None, :, :], axis=1)
            m = m_new
        stat = (pid_bh * n_splits + pid_s) * G_P + offs_g
        tl.store(m_ptr + stat, m)
        tl.store(l_ptr + stat, lsum)
        tl.store(o_ptr + stat[:, None] * D + offs_d[None, :], acc, mask=dmask[None, :])

    @triton.jit(do_not_specialize=["n_splits"])
    def _sparse_attn_merge_kernel(
        m_ptr,
        l_ptr,
        o_ptr,
        out_ptr,
        lse_ptr,
        n_splits,
        G: tl.constexpr,  # real group size: padded rows g >= G are not written
        G_P: tl.constexpr,  # padded group size (tile dimension)
        NS_P: tl.constexpr,  # next pow2 of n_splits (tile dimension of the stats load)
        D: tl.constexpr,  # head dim
        D_P: tl.constexpr,  # next pow2 of D (tile dimension)
    ):
        """Grid ``(B*H_kv,)``. Log-sum-exp merge of the splits into ``out (B*H, D)`` fp32
        and ``lse (B*H,)`` (natural log of the softmax denominator); a head with nothing
        attended gets zeros and -inf."""
        pid_bh = tl.program_id(0).to(tl.int64)
        offs_g = tl.arange(0, G_P)
        offs_s = tl.arange(0, NS_P)
        smask = offs_s < n_splits
        st = (pid_bh * n_splits + offs_s[:, None]) * G_P + offs_g[None, :]
        ms = tl.load(m_ptr + st, mask=smask[:, None], other=float("-inf"))  # (NS_P, G_P)
        ls = tl.load(l_ptr + st, mask=smask[:, None], other=0.0)
        mx = tl.max(ms, axis=0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        L = tl.sum(tl.exp2(ms - mx[None, :]) * ls, axis=0)
        inv = tl.where(L > 0, 1.0 / tl.where(L > 0, L, 1.0), 0.0)
        offs_d = tl.arange(0, D_P)
        dmask = offs_d < D
        acc = tl.zeros([G_P, D_P], tl.float32)
        for s_i in range(0, n_splits):
            row = (pid_bh * n_splits + s_i) * G_P + offs_g
            a = tl.exp2(tl.load(m_ptr + row) - mx) * inv
            o = tl.load(o_ptr + row[:, None] * D + offs_d[None, :], mask=dmask[None, :], other=0.0)
            acc += o * a[:, None]
        tl.store(
            out_ptr + (pid_bh * G + offs_g[:, None]) * D + offs_d[None, :],
            acc,
            mask=(offs_g < G)[:, None] & dmask[None, :],
        )
        lse = tl.where(
            L > 0, (mx + tl.log2(tl.where(L > 0, L, 1.0))) * 0.6931471805599453, float("-inf")
        )
        tl.store(lse_ptr + pid_bh * G + offs_g, lse, mask=offs_g < G)


def triton_interpreter_active() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1
    was set before triton was first imported)."""
    if not _HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    # tl.sum / tl.max are themselves jit functions bound when triton was first imported
    return isinstance(_kmeans_assign_kernel, InterpretedFunction) and isinstance(
        tl.sum, InterpretedFunction
    )


def _kernel(k, on_cuda: bool):
    # triton.jit binds to the interpreter at decoration time: CPU tensors can only run
    # when TRITON_INTERPRET=1 preceded the first triton import
    if not _HAS_TRITON:
        raise RuntimeError("triton is not available; use the *_ref functions")
    if not on_cuda and not triton_interpreter_active():
        raise RuntimeError(
            "clusterkv Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton "
            "is first imported; use the *_ref functions instead"
        )
    return k


def _n_sm(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter: pretend H100 so that tests see the GPU split logic


# ----------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------


def kmeans_assign_triton(
    x: torch.Tensor,
    centroids: torch.Tensor,
    return_scores: bool = False,
    *,
    block_m: int = 64,
    block_c: int = 32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`kmeans_assign_ref` as one fused kernel (shapes and tie rule identical)."""
    xb, squeeze = _batched(x, 3)
    cb, _ = _batched(centroids, 3)
    BH, M, d = xb.shape
    C = cb.shape[1]
    if cb.shape[0] != BH or cb.shape[2] != d:
        raise ValueError(f"centroids {tuple(cb.shape)} do not match points {tuple(xb.shape)}")
    if M and BH and not C:
        raise ValueError("kmeans_assign needs at least one centroid")
    dev = xb.device
    xb = _last_dim_contig(xb)
    cn = torch.nn.functional.normalize(cb.float(), dim=-1, eps=_NORM_EPS).contiguous()
    labels = torch.empty(BH, M, dtype=torch.int64, device=dev)
    best = torch.empty(BH, M, dtype=torch.float32, device=dev)
    if M and C and BH:
        _kernel(_kmeans_assign_kernel, dev.type == "cuda")[(triton.cdiv(M, block_m), BH)](
            xb,
            xb.stride(0),
            xb.stride(1),
            cn,
            cn.stride(0),
            cn.stride(1),
            labels,
            best,
            M,
            C,
            D=d,
            D_P=max(16, _next_pow2(d)),
            BLOCK_M=block_m,
            BLOCK_C=block_c,
            num_warps=4,
        )
    if squeeze:
        labels, best = labels[0], best[0]
    return (labels, best) if return_scores else labels


def kmeans_update_triton(
    x: torch.Tensor, labels: torch.Tensor, n_clusters: int, *, block_m: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kmeans_update_ref` with a deterministic segment-sum kernel.

    The points are ordered by label with a stable sort (torch), then one program per
    (cluster, head) sums its run in a fixed order: no atomics, same result every run.
    """
    xb, squeeze = _batched(x, 3)
    lb, _ = _batched(labels, 2)
    BH, M, d = xb.shape
    C = int(n_clusters)
    dev = xb.device
    xb = _last_dim_contig(xb)
    lb = lb.long()
    order = torch.sort(lb, dim=-1, stable=True).indices.contiguous()
    flat = (lb + torch.arange(BH, device=dev)[:, None] * C).reshape(-1)
    counts = torch.bincount(flat, minlength=BH * C).view(BH, C)
    start = torch.zeros(BH, C + 1, dtype=torch.int64, device=dev)
    start[:, 1:] = torch.cumsum(counts, dim=-1)
    cent = torch.empty(BH, C, d, dtype=torch.float32, device=dev)
    if C and BH:
        _kernel(_kmeans_update_kernel, dev.type == "cuda")[(C, BH)](
            xb,
            xb.stride(0),
            xb.stride(1),
            order,
            start,
            cent,
            M,
            C,
            D=d,
            D_P=_next_pow2(d),
            BLOCK_M=block_m,
            num_warps=4,
        )
    if squeeze:
        return cent[0], counts[0]
    return cent, counts


def select_clusters_triton(
    scores: torch.Tensor,
    sizes: torch.Tensor,
    budget: int,
    offsets: torch.Tensor | None = None,
    *,
    block_c: int = 64,
    block_p: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_clusters_ref` with two kernels (rank by all-pairs comparison, then
    expansion); any number of clusters. No host synchronisation."""
    BH, C = scores.shape
    budget = int(budget)
    dev = scores.device
    if offsets is None:
        offsets = _exclusive_cumsum(sizes)
    if C == 0 or budget == 0:
        z = torch.zeros(BH, budget, dtype=torch.int64, device=dev)
        return z, torch.zeros(BH, dtype=torch.int64, device=dev)
    s = _nan_to_neg_inf(scores).contiguous()
    sz = sizes.contiguous()
    off = offsets.contiguous()
    start = torch.empty(BH, C, dtype=torch.int64, device=dev)
    index = torch.empty(BH, budget, dtype=torch.int64, device=dev)
    on_cuda = dev.type == "cuda"
    if BH:
        _kernel(_cluster_rank_kernel, on_cuda)[(triton.cdiv(C, block_c), BH)](
            s, sz, start, C, BLOCK_C=block_c, BLOCK_O=block_c, num_warps=4
        )
        _kernel(_cluster_expand_kernel, on_cuda)[(triton.cdiv(budget, block_p), BH)](
            start, sz, off, index, C, budget, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4
        )
    n_valid = sizes.long().sum(-1).clamp(max=budget)
    return index, n_valid


def _plan_splits(n_sel: int, BH: int, block_n: int, n_sm: int, split_len=None):
    """About two waves of programs, splits of >= 4 tiles; split_len a multiple of block_n."""
    if n_sel == 0:
        return 1, block_n
    if split_len is None:
        want = max(1, (2 * n_sm) // max(1, BH))
        n = max(1, min(want, -(-n_sel // (4 * block_n))))
        split_len = -(-n_sel // n)
    split_len = max(block_n, -(-int(split_len) // block_n) * block_n)
    return -(-n_sel // split_len), split_len


def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    n_valid: torch.Tensor,
    scale: float,
    *,
    block_n: int | None = None,
    split_len: int | None = None,
    num_warps: int = 4,
    return_lse: bool = False,
):
    """:func:`sparse_attention_ref` with a split-list (flash-decoding) kernel and a merge.

    k/v may be views into a preallocated cache (last stride 1); ``index`` int32/int64.
    """
    B, H, Q, d = q.shape
    if Q != 1:
        raise ValueError(f"sparse_attention is single-query; got Q={Q}")
    H_kv, n_sel = k.shape[1], index.shape[2]
    if H % H_kv:
        raise ValueError(f"H={H} is not a multiple of H_kv={H_kv}")
    g = H // H_kv
    G_P = _next_pow2(g)
    D_P = _next_pow2(d)
    BH = B * H_kv
    dev = q.device
    f32 = torch.float32
    qf = q.reshape(B, H_kv, g, d).to(f32)
    if G_P != g:
        qf = torch.nn.functional.pad(qf, (0, 0, 0, G_P - g))
    qf = qf.reshape(BH * G_P, d).contiguous()
    k, v = _last_dim_contig(k), _last_dim_contig(v)
    idx = _last_dim_contig(index)
    nv = n_valid.to(device=dev, dtype=torch.int32).expand(B, H_kv).contiguous()
    if block_n is None:
        # the (G_P, BLOCK_N, D_P) broadcast products stay register-resident at <= 8192
        block_n = max(4, min(64, 8192 // (G_P * D_P)))
        block_n = 1 << (block_n.bit_length() - 1)
    n_splits, split_len = _plan_splits(n_sel, BH, block_n, _n_sm(dev), split_len)
    m_buf = torch.empty(BH * n_splits * G_P, dtype=f32, device=dev)
    l_buf = torch.empty_like(m_buf)
    o_buf = torch.empty(BH * n_splits * G_P * d, dtype=f32, device=dev)
    out = torch.empty(B * H, d, dtype=f32, device=dev)
    lse = torch.full((B * H,), float("-inf"), dtype=f32, device=dev)
    on_cuda = dev.type == "cuda"
    if BH:
        _kernel(_sparse_attn_split_kernel, on_cuda)[(n_splits, BH)](
            qf,
            k,
            *k.stride()[:3],
            v,
            *v.stride()[:3],
            idx,
            *idx.stride()[:2],
            nv,
            m_buf,
            l_buf,
            o_buf,
            H_kv,
            n_sel,
            split_len,
            n_splits,
            float(scale) * _LOG2E,
            G_P=G_P,
            D=d,
            D_P=D_P,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
        _kernel(_sparse_attn_merge_kernel, on_cuda)[(BH,)](
            m_buf,
            l_buf,
            o_buf,
            out,
            lse,
            n_splits,
            G=g,
            G_P=G_P,
            NS_P=_next_pow2(n_splits),
            D=d,
            D_P=D_P,
            num_warps=4,
        )
    out = out.view(B, H, 1, d).to(q.dtype)
    return (out, lse.view(B, H)) if return_lse else out


# ----------------------------------------------------------------------------------------
# dispatchers and k-means driver
# ----------------------------------------------------------------------------------------


def kmeans_assign(x, centroids, return_scores: bool = False):
    """Cosine assignment (see :func:`kmeans_assign_ref`): Triton on CUDA, else torch."""
    if _use_triton(x):
        return kmeans_assign_triton(x, centroids, return_scores)
    return kmeans_assign_ref(x, centroids, return_scores)


def kmeans_update(x, labels, n_clusters: int):
    """Mean-of-members update (see :func:`kmeans_update_ref`): Triton on CUDA, else torch."""
    if _use_triton(x):
        return kmeans_update_triton(x, labels, n_clusters)
    return kmeans_update_ref(x, labels, n_clusters)


# The Triton selection compares all pairs of clusters (O(C^2) per row): on an H100 it took
# 13 + 13 us at C = 409 but 70 + 44 us at C = 1637 and milliseconds at C = 16k (8-token
# clusters at 128k), where the sort-based torch path (a few device launches, no host sync)
# costs tens of us. Above this many clusters the dispatcher takes the torch path.
TRITON_SELECT_MAX_CLUSTERS = 1024


def select_clusters(scores, sizes, budget: int, offsets=None):
    """Budgeted cluster selection (see :func:`select_clusters_ref`): Triton on CUDA up to
    :data:`TRITON_SELECT_MAX_CLUSTERS` clusters, else the sort-based torch path."""
    if _use_triton(scores) and scores.shape[-1] <= TRITON_SELECT_MAX_CLUSTERS:
        return select_clusters_triton(scores, sizes, budget, offsets)
    return select_clusters_ref(scores, sizes, budget, offsets)


def sparse_attention(q, k, v, index, n_valid, scale: float, return_lse: bool = False):
    """Index-list decode attention (see :func:`sparse_attention_ref`): Triton on CUDA, else torch."""
    if _use_triton(q):
        return sparse_attention_triton(q, k, v, index, n_valid, scale, return_lse=return_lse)
    return sparse_attention_ref(q, k, v, index, n_valid, scale, return_lse)


def kmeans(
    x: torch.Tensor,
    n_clusters: int,
    iters: int = 20,
    seed: int = 0,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means, batched over heads (ClusterKV's clustering of the keys).

    Lloyd iterations: cosine assignment, centroid = mean of the raw members. Initial
    centroids are ``n_clusters`` distinct points per head drawn with a CPU generator
    seeded by ``seed`` (same draw on every device). After each update but the last, an
    empty cluster is re-seeded with a worst-fitting point of its head (lowest cosine to its
    centroid; the i-th empty cluster by id takes the i-th worst point), so the result is
    deterministic. The returned centroids are the means of the returned labels' members
    (an empty cluster after the last update keeps a zero centroid and size 0).

    Args:
        x: ``(M, d)`` or ``(BH, M, d)`` points.
        n_clusters: C, ``1 <= C <= M``.
        iters: Lloyd iterations (>= 1).
        seed: initialisation seed.
        impl: ``"ref"`` / ``"triton"`` to force a path; None = dispatch on the device.

    Returns:
        ``(centroids (BH, C, d) fp32, labels (BH, M) int64)`` (no BH dim for a 2-D x).
    """
    xb, squeeze = _batched(x, 3)
    BH, M, d = xb.shape
    C = int(n_clusters)
    if not 1 <= C <= M:
        raise ValueError(f"n_clusters must be in 1..{M} (number of points), got {C}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if impl is None:
        impl = "triton" if _use_triton(xb) else "ref"
    assign = kmeans_assign_triton if impl == "triton" else kmeans_assign_ref
    update = kmeans_update_triton if impl == "triton" else kmeans_update_ref
    dev = xb.device
    xf = xb.float().contiguous()
    g = torch.Generator().manual_seed(int(seed))
    init = torch.rand(BH, M, generator=g).argsort(dim=-1)[:, :C].to(dev)
    cent = xf.gather(1, init[..., None].expand(BH, C, d))
    xnorm = xf.norm(dim=-1).clamp_min(_NORM_EPS)
    labels = None
    for it in range(iters):
        labels, best = assign(xf, cent, return_scores=True)
        cent, counts = update(xf, labels, C)
        empty = counts == 0
        if it < iters - 1 and bool(empty.any()):
            worst = torch.argsort(best / xnorm, dim=-1, stable=True)  # (BH, M) worst first
            rank = (torch.cumsum(empty.long(), dim=-1) - 1).clamp(min=0)
            pick = worst.gather(1, rank)  # i-th empty cluster <- i-th worst point
            seeded = xf.gather(1, pick[..., None].expand(BH, C, d))
            cent = torch.where(empty[..., None], seeded, cent)
    if squeeze:
        return cent[0], labels[0]
    return cent, labels
