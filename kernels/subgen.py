"""SubGen kernels: streaming threshold clustering of keys, l2 value sampling, estimator attention.

Method: "SubGen: Token Generation in Sublinear Time and Memory" (also titled ClusterGen).
Per kv head the keys that leave the exact window are streamed through two structures:

* threshold clustering: a key joins the *first* centre (in creation order) within
  distance ``delta``, else it opens a new cluster whose centre is that key (centres never
  move); each cluster keeps its size ``n_c`` and ``t`` reservoir slots, each slot an
  independent uniform sample of the cluster's members (slot replaced with probability
  ``1 / n_c`` when a member arrives);
* an l2 value reservoir: ``s`` slots of ``(k, v)`` pairs, each slot an independent sample
  with probability proportional to ``|v|^2`` (slot replaced with probability
  ``|v_i|^2 / mu_i``, ``mu_i`` the running total of ``|v|^2`` including token i).

At decode, per query ``q`` (logits ``l(k) = scale * q.k``)::

    Z_hat = sum_c (n_c / t) sum_{slots j of c} exp(l(k_cj))           (denominator)
    N_hat = (mu / s) sum_{slots j} exp(l(rk_j)) * rv_j / |rv_j|^2        (numerator)
    out   = (N_exact + N_hat) / (Z_exact + Z_hat)

with the exact sinks and recent window in ``N_exact``/``Z_exact``, all three parts sharing
one running max. Both estimates are unbiased.

Public entry points (``*_ref`` torch reference, ``*_triton`` kernel, bare name dispatches:
Triton for CUDA tensors, else the reference):

* :func:`value_accept_probs` -- running ``|v|^2`` totals and each token's replacement
  probability (shared by both paths, so they take identical decisions);
* :func:`append` -- cluster assignment + cluster and value reservoir updates, in place;
* :func:`estimate_attention` -- estimator + exact attention for any number of queries.

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
    "append",
    "append_ref",
    "append_triton",
    "estimate_attention",
    "estimate_attention_ref",
    "estimate_attention_triton",
    "triton_interpreter_active",
    "value_accept_probs",
]

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
    """Replacement probability of each new token in the l2 value reservoir.

    Args:
        v: ``(BH, M, d)`` new values.
        valid: ``(BH, M)`` bool; invalid (padding) tokens have weight 0.
        mu: ``(BH,)`` fp32 running total of ``|v|^2`` before these tokens.

    Returns:
        ``(p (BH, M) fp32, mu_new (BH,) fp32)`` with ``p_i = |v_i|^2 / mu_i`` where ``mu_i``
        includes token i (0 where ``mu_i == 0``). The first token of a stream with a
        non-zero value has ``p = 1`` and so fills every slot.
    """
    w = v.float().pow(2).sum(-1) * valid
    run = mu.float()[:, None] + torch.cumsum(w, dim=1)
    p = torch.where(run > 0, w / torch.where(run > 0, run, torch.ones_like(run)), 0.0)
    new = run[:, -1] if run.shape[1] else mu.float()
    return p, new


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


def append_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    delta: torch.Tensor,
    centres: torch.Tensor,
    counts: torch.Tensor,
    n_clusters: torch.Tensor,
    samples: torch.Tensor,
    res_k: torch.Tensor,
    res_v: torch.Tensor,
    u_clu: torch.Tensor,
    p_val: torch.Tensor,
    u_val: torch.Tensor,
) -> torch.Tensor:
    """Stream ``M`` new tokens per row into the clustering and the value reservoir (in place).

    Semantics are those of processing the tokens one by one in order: a valid token joins
    the first centre (lowest id) with ``|k - centre|^2 <= delta^2``, else opens cluster
    ``n_clusters`` with centre k; its cluster's count becomes ``n``; sample slot ``j`` of that
    cluster takes k when ``u_clu[i, j] < 1 / n``; value slot ``j`` takes (k, v) when
    ``u_val[i, j] < p_val[i]``. Vectorised: existing centres are scored in chunks, tokens
    that match none are clustered among themselves leader by leader (the first unmatched
    token opens a cluster and takes every later unmatched token within delta, which is
    exactly what the sequential rule does), and each reservoir slot keeps its last
    accepted token.

    Args:
        k, v: ``(BH, M, d)`` new keys / values.
        valid: ``(BH, M)`` bool; invalid tokens change nothing and get label -1.
        delta: ``(BH,)`` fp32 cluster radius per row.
        centres: ``(BH, Cap, d)``; counts ``(BH, Cap)`` int32 (0 beyond ``n_clusters``);
            n_clusters ``(BH,)`` int32; samples ``(BH, Cap, t, d)``;
            ``Cap >= n_clusters + M`` (room for every token to open a cluster).
        res_k, res_v: ``(BH, s, d)`` value reservoir.
        u_clu: ``(BH, M, t)`` and u_val ``(BH, M, s)`` uniforms in [0, 1); p_val ``(BH, M)``
            from :func:`value_accept_probs`.

    Returns:
        labels ``(BH, M)`` int64 (-1 for invalid tokens).
    """
    BH, M, d = k.shape
    Cap, t = samples.shape[1], samples.shape[2]
    dev = k.device
    if BH and int(n_clusters.max()) + M > Cap:
        raise ValueError(f"capacity {Cap} < clusters + new tokens; reserve before appending")
    rows = torch.arange(BH, device=dev)
    d2max = delta.float().pow(2)
    labels = torch.full((BH, M), -1, dtype=torch.int64, device=dev)
    cid = torch.arange(Cap, device=dev)
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
        while bool(free.any()):
            has = free.any(1)
            lead = torch.argmax(free.to(torch.int8), dim=1)  # first unmatched token per row
            lx = x[rows, lead]  # (BH, d)
            dist = _sq_dist(x, lx[:, None, :])[..., 0]  # (BH, m)
            join = free & (dist <= d2max[:, None]) & has[:, None]
            join[rows, lead] |= has  # the leader joins its own cluster whatever rounding says
            lab = torch.where(join, n_cur[:, None], lab)
            r = rows[has]
            centres[r, n_cur[has]] = lx[has].to(centres.dtype)
            n_cur = n_cur + has.long()
            free &= ~join
        n_clusters.copy_(n_cur.to(n_clusters.dtype))
        labels[:, a:b] = lab
        # member ranks: the i-th member of cluster c in this chunk has count n0_c + i
        safe = lab.clamp(min=0)
        onehot = torch.nn.functional.one_hot(safe, Cap) * ok[..., None]
        rank = torch.cumsum(onehot, dim=1).gather(2, safe[..., None])[..., 0]
        n = counts.long().gather(1, safe) + rank  # (BH, m)
        counts += onehot.sum(1).to(counts.dtype)
        acc = (u_clu[:, a:b] < 1.0 / n.float().clamp(min=1)[..., None]) & ok[..., None]
        tok = torch.arange(a, b, device=dev)[None, :, None].expand(BH, b - a, t)
        last = torch.full((BH, Cap * t), -1, dtype=torch.int64, device=dev)
        flat = safe[..., None] * t + torch.arange(t, device=dev)
        last.scatter_reduce_(
            1, flat.reshape(BH, -1), torch.where(acc, tok, -1).reshape(BH, -1), "amax"
        )
        put = last >= 0
        src = k[rows[:, None].expand_as(last), last.clamp(min=0)]  # (BH, Cap*t, d)
        smp = samples.view(BH, Cap * t, d)
        smp.copy_(torch.where(put[..., None], src.to(samples.dtype), smp))
    # value reservoir: each slot keeps its last accepted token
    S = res_k.shape[1]
    acc = (u_val < p_val[..., None]) & valid[..., None]  # (BH, M, S)
    tok = torch.arange(M, device=dev)[None, :, None]
    last = torch.where(acc, tok, -1).amax(1) if M else torch.full((BH, S), -1, device=dev)
    put = (last >= 0)[..., None]
    idx = last.clamp(min=0)
    res_k.copy_(torch.where(put, k[rows[:, None], idx].to(res_k.dtype), res_k))
    res_v.copy_(torch.where(put, v[rows[:, None], idx].to(res_v.dtype), res_v))
    return labels


def estimate_attention_ref(
    q: torch.Tensor,
    k_ex: torch.Tensor,
    v_ex: torch.Tensor,
    mask_ex: torch.Tensor | None,
    samples: torch.Tensor,
    counts: torch.Tensor,
    res_k: torch.Tensor,
    res_v: torch.Tensor,
    mu: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Exact attention over ``k_ex/v_ex`` plus the SubGen estimate of the streamed tokens.

    Args:
        q: ``(B, H, Q, d)`` queries (GQA: query head h reads kv head ``h // (H / H_kv)``).
        k_ex, v_ex: ``(B, H_kv, E, d)`` exact tokens (sinks, window, current).
        mask_ex: ``(B, Q, E)`` bool, True = attend (None: all). The streamed tokens are
            visible to every query (they are older than all of them and padding never
            enters the streams).
        samples: ``(B, H_kv, C, t, d)`` cluster key samples; counts ``(B, H_kv, C)`` int
            cluster sizes (0 = unused cluster).
        res_k, res_v: ``(B, H_kv, s, d)`` value reservoir; a slot with ``|v| = 0`` is unused.
        mu: ``(B, H_kv)`` fp32 running ``sum |v|^2``.
        scale: softmax scale.

    Returns:
        ``(B, H, Q, d)`` in q's dtype, computed in fp32; a query that sees nothing gets 0.
    """
    B, H, Q, d = q.shape
    H_kv = k_ex.shape[1]
    g = H // H_kv
    C, t = samples.shape[2], samples.shape[3]
    S = res_k.shape[2]
    qg = q.float().reshape(B, H_kv, g * Q, d)
    s_ex = torch.matmul(qg, k_ex.float().transpose(-1, -2)) * scale  # (B, H_kv, gQ, E)
    if mask_ex is not None:
        m = mask_ex[:, None, None].expand(B, 1, g, Q, -1).reshape(B, 1, g * Q, -1)
        s_ex = s_ex.masked_fill(~m, float("-inf"))
    smp = samples.float().reshape(B, H_kv, C * t, d)
    s_sm = torch.matmul(qg, smp.transpose(-1, -2)) * scale  # (B, H_kv, gQ, C*t)
    w_sm = (counts.float() / t).repeat_interleave(t, dim=-1)  # (B, H_kv, C*t)
    s_sm = s_sm.masked_fill(~(w_sm > 0)[:, :, None], float("-inf"))
    rv = res_v.float()
    nrm = rv.pow(2).sum(-1)  # (B, H_kv, S)
    live = (nrm > 0) & (mu.float()[..., None] > 0)
    w_rv = torch.where(live, mu.float()[..., None] / (S * torch.where(live, nrm, 1.0)), 0.0)
    s_rv = torch.matmul(qg, res_k.float().transpose(-1, -2)) * scale  # (B, H_kv, gQ, S)
    s_rv = s_rv.masked_fill(~live[:, :, None], float("-inf"))
    mx = torch.cat([s_ex, s_sm, s_rv], dim=-1).amax(-1, keepdim=True)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    p_ex, p_sm, p_rv = (torch.exp(x - mx) for x in (s_ex, s_sm, s_rv))
    den = p_ex.sum(-1) + (p_sm * w_sm[:, :, None]).sum(-1)
    num = torch.matmul(p_ex, v_ex.float()) + torch.matmul(p_rv * w_rv[:, :, None], rv)
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
        smp_ptr,
        rk_ptr,
        rv_ptr,
        uc_ptr,
        pv_ptr,
        uv_ptr,
        lab_ptr,
        M,
        Cap,
        T: tl.constexpr,  # samples per cluster (slot loop unrolled over T_P lanes)
        T_P: tl.constexpr,  # next pow2 of T (tile dimension)
        S: tl.constexpr,  # value reservoir slots
        S_P: tl.constexpr,  # next pow2 of S (tile dimension)
        D: tl.constexpr,  # head dim: constexpr so the d-mask folds away when D == D_P
        D_P: tl.constexpr,  # next pow2 of D (tile dimension)
        BLOCK_C: tl.constexpr,  # centres scored per step (tile dimension)
    ):
        """Grid ``(BH,)``: one program streams the M tokens of its row in order (the
        clustering is sequential: a token may join a cluster opened by the previous one).
        Per token: squared distances to every centre in tiles, first hit within delta (or
        a new cluster), count += 1, sample slots replaced where ``u < 1/count``, value
        slots where ``u < p``. All state lives in global memory; a barrier after each
        token makes its stores visible to the next token's loads across the program's
        threads."""
        row = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, D_P)
        dmask = offs_d < D
        offs_t = tl.arange(0, T_P)
        offs_s = tl.arange(0, S_P)
        d2max = tl.load(delta_ptr + row)
        d2max = d2max * d2max
        ncl = tl.load(ncl_ptr + row)
        for i in range(0, M):
            tok = row * M + i
            act = (tl.load(ok_ptr + tok) != 0).to(tl.int32)
            active = act != 0
            kx = tl.load(k_ptr + tok * D + offs_d, mask=dmask, other=0.0)
            x = kx.to(tl.float32)
            xx = tl.sum(x * x, axis=0)
            best = tl.full([], _NO_HIT_TL, tl.int32)
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
            is_new = best == _NO_HIT_TL
            lab = tl.where(is_new, ncl, best)
            opened = is_new.to(tl.int32) * act
            # vector & scalar-bool masks trip the interpreter: broadcast the flags as ints
            tl.store(
                cen_ptr + (row * Cap + lab) * D + offs_d,
                kx.to(cen_ptr.dtype.element_ty),
                mask=dmask & (offs_d * 0 + opened != 0),
            )
            n = tl.load(cnt_ptr + row * Cap + lab) + 1
            tl.store(cnt_ptr + row * Cap + lab, n, mask=active)
            ncl = ncl + opened
            u = tl.load(uc_ptr + tok * T + offs_t, mask=offs_t < T, other=1.0)
            take = (u < 1.0 / n.to(tl.float32)) & (offs_t < T) & (offs_t * 0 + act != 0)
            tl.store(
                smp_ptr + ((row * Cap + lab) * T + offs_t[:, None]) * D + offs_d[None, :],
                tl.zeros([T_P, D_P], tl.float32).to(smp_ptr.dtype.element_ty)
                + kx.to(smp_ptr.dtype.element_ty)[None, :],
                mask=take[:, None] & dmask[None, :],
            )
            p = tl.load(pv_ptr + tok)
            uv = tl.load(uv_ptr + tok * S + offs_s, mask=offs_s < S, other=1.0)
            take_v = (uv < p) & (offs_s < S) & (offs_s * 0 + act != 0)
            vx = tl.load(v_ptr + tok * D + offs_d, mask=dmask, other=0.0)
            slot = (row * S + offs_s[:, None]) * D + offs_d[None, :]
            zero = tl.zeros([S_P, D_P], tl.float32)
            tl.store(
                rk_ptr + slot,
                (zero + x[None, :]).to(rk_ptr.dtype.element_ty),
                mask=take_v[:, None] & dmask[None, :],
            )
            tl.store(
                rv_ptr + slot,
                (zero + vx.to(tl.float32)[None, :]).to(rv_ptr.dtype.element_ty),
                mask=take_v[:, None] & dmask[None, :],
            )
            tl.store(lab_ptr + tok, tl.where(active, lab, -1).to(tl.int64))
            tl.debug_barrier()
        tl.store(ncl_ptr + row, ncl)

    @triton.jit
    def _online(m, lsum, acc, s, w, vv, HAS_V: tl.constexpr, IN_DEN: tl.constexpr):
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
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vv[None, :, :], axis=1)
        else:
            acc = acc * alpha[:, None]
        return m_new, lsum, acc

    @triton.jit(do_not_specialize=["Q", "E", "NS", "H_kv"])
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
        cnt_ptr,
        rk_ptr,
        rv_ptr,
        mu_ptr,
        out_ptr,
        H_kv,
        Q,
        E,
        NS,
        scale_log2e,
        inv_t,
        inv_s,
        G: tl.constexpr,  # query heads per kv head (row -> head arithmetic folds)
        T: tl.constexpr,  # samples per cluster (sample -> cluster division folds)
        S: tl.constexpr,  # value slots
        HAS_MASK: tl.constexpr,  # no mask: skip its loads entirely
        D: tl.constexpr,  # head dim
        D_P: tl.constexpr,  # next pow2 of D (tile dimension)
        BLOCK_R: tl.constexpr,  # query rows (group heads x queries) per program
        BLOCK_N: tl.constexpr,  # tokens / samples / slots per tile
    ):
        """Grid ``(cdiv(G*Q, BLOCK_R), B*H_kv)``. Rows ``r = gi*Q + qi`` are the group's
        query heads x queries, so each K/V row is read once for the whole group (no GQA
        copy). Three passes share one online softmax: exact tokens (masked per query),
        cluster samples (denominator only, weight ``n_c / t``), value slots (numerator
        only, weight ``mu / (s |v|^2)``). Writes ``out (B, H, Q, D)`` fp32."""
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
            s = tl.sum(qv[:, None, :] * kk[None, :, :], axis=2)  # (BLOCK_R, BLOCK_N)
            live = rmask[:, None] & nmask[None, :]
            if HAS_MASK:
                mk = tl.load(
                    mask_ptr + b * stride_mb + qi[:, None] * stride_mq + offs_n[None, :],
                    mask=live,
                    other=0,
                )
                live = live & (mk != 0)
            s = tl.where(live, s, float("-inf"))
            m, lsum, acc = _online(m, lsum, acc, s, ones, vv, True, True)
        # cluster samples: denominator only
        for n0 in range(0, NS, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < NS
            kk = tl.load(
                smp_ptr + (pid_bh * NS + offs_n[:, None]) * D + offs_d[None, :],
                mask=nmask[:, None] & dmask[None, :],
                other=0.0,
            ).to(tl.float32)
            n_c = tl.load(cnt_ptr + pid_bh * (NS // T) + offs_n // T, mask=nmask, other=0)
            w = n_c.to(tl.float32) * inv_t
            s = tl.sum(qv[:, None, :] * kk[None, :, :], axis=2)
            s = tl.where(rmask[:, None] & (w > 0)[None, :], s, float("-inf"))
            m, lsum, acc = _online(m, lsum, acc, s, w, kk, False, True)
        # value slots: numerator only
        mu = tl.load(mu_ptr + pid_bh)
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
            nrm = tl.sum(vv * vv, axis=1)
            ok = nmask & (nrm > 0) & (nrm * 0.0 + mu > 0)  # vector-wide test (interpreter)
            w = tl.where(ok, mu * inv_s / tl.where(ok, nrm, 1.0), 0.0)
            s = tl.sum(qv[:, None, :] * kk[None, :, :], axis=2)
            s = tl.where(rmask[:, None] & ok[None, :], s, float("-inf"))
            m, lsum, acc = _online(m, lsum, acc, s, w, vv, True, False)
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


def append_triton(
    k, v, valid, delta, centres, counts, n_clusters, samples, res_k, res_v, u_clu, p_val, u_val
) -> torch.Tensor:
    """:func:`append_ref` as one sequential Triton program per row (same arguments; the
    state tensors must be contiguous, they are updated in place)."""
    _check_runnable(k)
    BH, M, d = k.shape
    Cap, t = samples.shape[1], samples.shape[2]
    S = res_k.shape[1]
    for name, x in (("centres", centres), ("counts", counts), ("n_clusters", n_clusters),
                    ("samples", samples), ("res_k", res_k), ("res_v", res_v)):  # fmt: skip
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (updated in place)")
    if BH and int(n_clusters.max()) + M > Cap:
        raise ValueError(f"capacity {Cap} < clusters + new tokens; reserve before appending")
    labels = torch.empty(BH, M, dtype=torch.int64, device=k.device)
    if BH == 0 or M == 0:
        return labels
    _subgen_append_kernel[(BH,)](
        k.contiguous(),
        v.contiguous(),
        valid.to(torch.int8).contiguous(),
        delta.float().contiguous(),
        centres,
        counts,
        n_clusters,
        samples,
        res_k,
        res_v,
        u_clu.float().contiguous(),
        p_val.float().contiguous(),
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
    return labels


def estimate_attention_triton(
    q, k_ex, v_ex, mask_ex, samples, counts, res_k, res_v, mu, scale: float
) -> torch.Tensor:
    """:func:`estimate_attention_ref` as one Triton kernel (same arguments)."""
    _check_runnable(q)
    B, H, Q, d = q.shape
    H_kv, E = k_ex.shape[1], k_ex.shape[2]
    g = H // H_kv
    C, t = samples.shape[2], samples.shape[3]
    S = res_k.shape[2]
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
        samples.contiguous(),
        counts.to(torch.int32).contiguous(),
        res_k.contiguous(),
        res_v.contiguous(),
        mu.float().contiguous(),
        out,
        H_kv,
        Q,
        E,
        C * t,
        float(scale) * _LOG2E,
        1.0 / t,
        1.0 / S,
        G=g,
        T=t,
        S=S,
        HAS_MASK=mask_ex is not None,
        D=d,
        D_P=_next_pow2(max(d, 16)),
        BLOCK_R=BLOCK_R,
        BLOCK_N=16,
        num_warps=4,
    )
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------
# dispatchers
# ----------------------------------------------------------------------------------------


def append(
    k, v, valid, delta, centres, counts, n_clusters, samples, res_k, res_v, u_clu, p_val, u_val
):
    """Stream tokens into the SubGen state (see :func:`append_ref`): Triton on CUDA, else torch."""
    fn = append_triton if _use_triton(k) else append_ref
    return fn(
        k, v, valid, delta, centres, counts, n_clusters, samples, res_k, res_v, u_clu, p_val, u_val
    )


def estimate_attention(q, k_ex, v_ex, mask_ex, samples, counts, res_k, res_v, mu, scale: float):
    """SubGen decode attention (see :func:`estimate_attention_ref`): Triton on CUDA, else torch."""
    fn = estimate_attention_triton if _use_triton(q) else estimate_attention_ref
    return fn(q, k_ex, v_ex, mask_ex, samples, counts, res_k, res_v, mu, scale)
