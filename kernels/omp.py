"""Batched orthogonal matching pursuit (OMP) over a fixed dictionary.

A vector ``x`` (length ``d``) is approximated by ``s`` atoms (columns) of a dictionary
``D`` of shape ``(d, N)`` with unit-norm columns::

    x ~= sum_j coef[j] * D[:, idx[j]]

The reference (:func:`omp_ref`) and the Triton kernel (:func:`omp_triton`) follow the
"Gram" variant of OMP, whose cost per vector is
``O(N d + s^2 N)`` instead of the ``O(s N d)`` of recomputing ``D^T r`` every step:

* ``p = D^T x`` once;
* ``s`` times: pick the not-yet-chosen atom with the largest ``|c|`` (``c = p`` at first),
  extend the inverse Cholesky factor ``B = L^{-1}`` of ``G[I, I]`` (``G = D^T D``) by one
  row, get the coefficients ``a = B^T B p[I]`` and update ``c = p - G[:, I] a``.

The inverse factor (rather than ``L``) turns both triangular solves of each step into
plain matrix-vector products, which batch well in torch and need no dynamic indexing in
Triton. ``z = B p[I]`` also gives the residual for free: ``||r||^2 = ||x||^2 - ||z||^2``.

:func:`omp_triton` also offers a GEMM variant for large batches on a GPU: the same factor
and coefficients, but each step recomputes the residual and its correlations ``D^T r`` with
the whole dictionary as one tensor-core product (bf16 by default), instead of reading Gram
rows; see the comment above ``_omp_corr_kernel``.

:func:`omp_cpu`, what :func:`omp` runs on CPU tensors, takes that route in torch: one
``(m, d) x (d, N)`` product per step, which a CPU runs near its peak, where the Gram
variant's per-vector Gram-row reads run far below it, and numpy's row argmax, ~10x
torch's (``scripts/bench_omp_cpu.py``). It needs no Gram matrix, so CPU models keep none.

A vector stops early (its remaining slots get ``idx 0`` and ``coef 0``, so every vector
keeps ``s`` slots) when it is zero, when ``tol`` is given and its relative residual is
``<= tol``, or when the atom it would add is (numerically) in the span of those it already
has, which would make the Cholesky factor singular.

This module is copied flat into exported checkpoints: it imports only torch and the
standard library, and optionally numpy (which transformers needs) and Triton, so it
imports (and the torch routes run) without them.
"""

from __future__ import annotations

import math

import torch

try:  # Triton is optional: without it the torch reference is used everywhere.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

try:  # numpy's row argmax is ~10x torch's on CPU; transformers brings numpy along
    import numpy
except ImportError:  # pragma: no cover - depends on the environment
    numpy = None

__all__ = ["omp", "omp_cpu", "omp_ref", "omp_triton", "reconstruct", "HAS_TRITON"]

HAS_TRITON = triton is not None

# An atom whose squared distance to the span of the atoms already chosen is below this
# fraction of its squared norm is treated as dependent: the vector stops instead of
# dividing by a near-zero pivot. 1e-6 keeps 1/pivot <= 1e3, far from fp32 trouble, while
# real dictionaries (even coherent ones) sit well above it.
DEP_EPS = 1e-6

# Upper bound on the temporary memory of one chunk: the reference's Gram-row cache and
# score arrays (m x (s + 4) x N floats) and the Triton launcher's p = D^T x scratch (m x N).
# On CPU the reference is memory-bound, and chunks whose working set stays near the last-
# level cache ran 2-3x faster than 8192-row chunks (measured on 2 EPYC cores, N = 1024 and
# 4096); a GPU only needs the bound to cap memory.
_WORKSPACE_BYTES = 256 * 2**20
_CPU_WORKSPACE_BYTES = 32 * 2**20
_MIN_CHUNK = 128


def _prepare(
    x: torch.Tensor, D: torch.Tensor, s: int, gram: torch.Tensor | None, need_gram: bool = True
):
    """Check shapes and return ``(x2 (M, d) fp32, D (d, N) fp32, G (N, N) fp32, lead)``
    (``G`` is ``None`` when not given and ``need_gram`` is false)."""
    if D.dim() != 2:
        raise ValueError(f"D must be (d, N), got shape {tuple(D.shape)}")
    d, n_atoms = D.shape
    if x.shape[-1] != d:
        raise ValueError(f"x has last dimension {x.shape[-1]} but D has d={d} rows")
    if not 1 <= s <= n_atoms:
        raise ValueError(f"s must be in [1, N={n_atoms}], got {s}")
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, d).to(torch.float32)
    Df = D.to(device=x2.device, dtype=torch.float32)
    if gram is None:
        G = Df.T @ Df if need_gram else None
    else:
        if tuple(gram.shape) != (n_atoms, n_atoms):
            raise ValueError(
                f"gram must be (N, N) = ({n_atoms}, {n_atoms}), got {tuple(gram.shape)}"
            )
        G = gram.to(device=x2.device, dtype=torch.float32)
    return x2, Df, G, lead


def _finish(idx, coef, err, lead, s, return_errors):
    idx = idx.reshape(*lead, s)
    coef = coef.reshape(*lead, s)
    if return_errors:
        return idx, coef, err.reshape(*lead, s)
    return idx, coef


def omp_ref(
    x: torch.Tensor,
    D: torch.Tensor,
    s: int,
    gram: torch.Tensor | None = None,
    tol: float | None = None,
    chunk: int = 8192,
    return_errors: bool = False,
):
    """Reference OMP in torch (any device), fp32 throughout.

    Args:
        x: ``(M, d)`` vectors (any float dtype; extra leading dims are flattened and restored).
        D: ``(d, N)`` dictionary with unit-norm columns.
        s: number of atoms per vector, ``1 <= s <= N``.
        gram: ``(N, N)`` cached ``D^T D``; computed when ``None``.
        tol: optional early stop once ``||x - x_hat|| <= tol * ||x||``.
        chunk: at most this many rows at once; fewer when the ``(m, s + 4, N)`` working set
            would pass 32 MiB on CPU (cache-friendly) or 256 MiB elsewhere.
        return_errors: also return the relative residual after 1..s atoms.

    Returns:
        ``idx (M, s)`` int64, ``coef (M, s)`` float32, and with ``return_errors`` also
        ``rel_err (M, s)`` float32 where ``rel_err[:, j] = ||x - x_hat_{j+1}|| / ||x||``
        (0 for zero rows). Unused slots have ``idx 0``, ``coef 0``.
    """
    x2, Df, G, lead = _prepare(x, D, s, gram)
    budget = _CPU_WORKSPACE_BYTES if x2.device.type == "cpu" else _WORKSPACE_BYTES
    step = max(1, min(chunk, max(_MIN_CHUNK, budget // (4 * (s + 4) * Df.shape[1]))))
    out = _chunked(x2, s, step, lambda xs: _omp_chunk(xs, Df, G, s, tol))
    return _finish(*out, lead, s, return_errors)


def _chunked(x2: torch.Tensor, s: int, step: int, code):
    """``code`` (rows -> ``(idx, coef, err)``) over ``x2`` in chunks of ``step`` rows."""
    M = x2.shape[0]
    idx = torch.zeros(M, s, dtype=torch.int64, device=x2.device)
    coef = torch.zeros(M, s, dtype=torch.float32, device=x2.device)
    err = torch.zeros(M, s, dtype=torch.float32, device=x2.device)
    for start in range(0, M, step):
        sl = slice(start, min(start + step, M))
        idx[sl], coef[sl], err[sl] = code(x2[sl])
    return idx, coef, err


class _Factor:
    """Per-chunk state of both torch routes: the inverse Cholesky factor ``B`` of
    ``G[I, I]``, ``z = B p[I]``, each slot's index (0 once a vector stopped), the atoms
    picked (before that zeroing), relative errors and which vectors stopped."""

    def __init__(self, x: torch.Tensor, s: int):
        m, dev = x.shape[0], x.device
        self.xx = (x * x).sum(1)
        self.done = self.xx <= 0
        self.safe_xx = torch.where(self.done, torch.ones_like(self.xx), self.xx)
        self.B = torch.zeros(m, s, s, device=dev)
        self.z = torch.zeros(m, s, device=dev)
        self.idx = torch.zeros(m, s, dtype=torch.int64, device=dev)
        self.picked = torch.zeros(m, s, dtype=torch.int64, device=dev)
        self.err = torch.zeros(m, s, device=dev)

    def extend(self, k, j, g, gjj, pj, tol):
        """Slot ``k``: extend ``B`` and ``z`` by atom ``j`` given ``g = G[I, j]``,
        ``gjj = G[j, j]``, ``pj = p[j]``; record the slot's index and relative error and
        which vectors stop. Returns the coefficients ``a = B^T z`` over slots ``0..k``."""
        B, z, done = self.B, self.z, self.done
        w = torch.bmm(B[:, :k, :k], g.unsqueeze(2)).squeeze(2)  # L^{-1} G[I, j]
        delta2 = gjj - (w * w).sum(1)
        active = ~done & (delta2 > DEP_EPS * gjj)
        inv_delta = torch.rsqrt(delta2.clamp_min(1e-30))
        u = torch.bmm(w.unsqueeze(1), B[:, :k, :k]).squeeze(1)
        # Inactive rows get an identity row with z_k = 0: the factor stays invertible and
        # their coefficient for this slot comes out exactly 0.
        B[:, k, :k] = torch.where(active.unsqueeze(1), -u * inv_delta.unsqueeze(1), 0.0)
        B[:, k, k] = torch.where(active, inv_delta, 1.0)
        z[:, k] = torch.where(active, (pj - (w * z[:, :k]).sum(1)) * inv_delta, 0.0)
        self.idx[:, k] = torch.where(active, j, 0)
        done |= ~active
        a = torch.bmm(z[:, None, : k + 1], B[:, : k + 1, : k + 1]).squeeze(1)  # B^T z
        # Summed over all s slots (zeros beyond k) so a stopped vector's value is bit-stable.
        r2 = (self.xx - (z * z).sum(1)).clamp_min(0.0)
        self.err[:, k] = torch.where(self.xx > 0, torch.sqrt(r2 / self.safe_xx), 0.0)
        if tol is not None:
            done |= self.err[:, k] <= tol
        return a


def _omp_chunk(x: torch.Tensor, D: torch.Tensor, G: torch.Tensor, s: int, tol: float | None):
    m = x.shape[0]
    dev = x.device
    rows = torch.arange(m, device=dev)
    p = x @ D  # (m, N)
    f = _Factor(x, s)
    # Gram rows of the chosen atoms, gathered once each so that the correlation update is a
    # single batched product per step.
    grows = torch.empty(m, s, G.shape[1], device=dev)
    score = p.abs()
    for k in range(s):
        if k:
            # Chosen atoms have c ~ 0 but not exactly; exclude them explicitly.
            score.scatter_(1, f.picked[:, :k], -1.0)
        j = score.argmax(1)
        f.picked[:, k] = j
        g = grows[:, :k].gather(2, j.view(m, 1, 1).expand(m, k, 1)).squeeze(2)  # G[I, j]
        a = f.extend(k, j, g, G[j, j], p[rows, j], tol)
        grows[:, k] = G[j]
        if k + 1 < s:
            # score = |p - G[:, I] a|, written in place of the previous scores.
            torch.baddbmm(
                p.unsqueeze(1),
                a.unsqueeze(1),
                grows[:, : k + 1],
                alpha=-1.0,
                out=score.unsqueeze(1),
            )
            score.abs_()
    return f.idx, a, f.err


def omp_cpu(
    x: torch.Tensor,
    D: torch.Tensor,
    s: int,
    gram: torch.Tensor | None = None,
    tol: float | None = None,
    chunk: int = 8192,
    return_errors: bool = False,
):
    """OMP for CPU tensors: :func:`omp_ref`'s atoms, coefficients and stopping rules, with
    the correlations of each step computed as ``|D^T r|`` from the residual
    ``r = x - D_I a`` (one matrix product for the whole chunk) instead of ``|p - G[:, I] a|``.
    The two are equal in exact arithmetic; in fp32 they choose the same atoms except at
    near-ties. ``gram`` is only checked: this route reads atoms, not Gram rows. Arguments
    and returns as in :func:`omp_ref`; ``x`` and ``D`` must be on the CPU. No gradient flows
    through the codes (as from the Triton kernel).
    """
    x2, Df, _, lead = _prepare(x, D, s, gram, need_gram=False)
    if x2.device.type != "cpu":
        raise ValueError(f"omp_cpu takes CPU tensors, got x on {x2.device}; use omp()")
    step = max(1, min(chunk, max(_MIN_CHUNK, _CPU_WORKSPACE_BYTES // (4 * Df.shape[1]))))
    x2, Df = x2.detach(), Df.detach()  # the products write into preallocated scores
    atoms_t = Df.T.contiguous()
    out = _chunked(x2, s, step, lambda xs: _omp_chunk_cpu(xs, Df, atoms_t, s, tol))
    return _finish(*out, lead, s, return_errors)


def _row_argmax(score: torch.Tensor) -> torch.Tensor:
    if numpy is None:  # pragma: no cover - depends on the environment
        return score.argmax(1)
    return torch.from_numpy(score.numpy().argmax(1)).long()  # first maximum, as torch's


def _omp_chunk_cpu(x, D, atoms_t, s: int, tol: float | None):
    m, d = x.shape
    f = _Factor(x, s)
    chosen = torch.zeros(m, s, d)  # the chosen atoms' vectors
    score = torch.empty(m, D.shape[1])
    r = x
    for k in range(s):
        torch.mm(r, D, out=score)
        score.abs_()
        if k:
            score.scatter_(1, f.picked[:, :k], -1.0)
        j = _row_argmax(score)
        f.picked[:, k] = j
        dj = atoms_t[j]  # (m, d)
        g = torch.bmm(chosen[:, :k], dj.unsqueeze(2)).squeeze(2)  # G[I, j]
        gjj, pj = (dj * dj).sum(1), (x * dj).sum(1)
        a = f.extend(k, j, g, gjj, pj, tol)
        chosen[:, k] = dj
        if k + 1 < s:  # stopped vectors' new coefficient is 0: their residual stays
            r = x - torch.bmm(a.unsqueeze(1), chosen[:, : k + 1]).squeeze(1)
    return f.idx, a, f.err


def reconstruct(idx: torch.Tensor, coef: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """``x_hat[m] = sum_j coef[m, j] * D[:, idx[m, j]]``.

    Args:
        idx: ``(..., s)`` integer atom indices.
        coef: ``(..., s)`` coefficients (any float dtype).
        D: ``(d, N)`` dictionary.

    Returns:
        ``(..., d)`` float32.
    """
    Df = D.to(device=coef.device, dtype=torch.float32)
    atoms = Df.T[idx.long()]  # (..., s, d)
    return (coef.to(torch.float32).unsqueeze(-1) * atoms).sum(-2)


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


if triton is not None:

    @triton.jit
    def _chol_extend(B, z, g, gjj, pj, ok, k, slot_2d, slot_row, DEP_TOL: tl.constexpr):
        """Both kernels' factor update: extend the inverse Cholesky factor ``B`` of
        ``G[I, I]`` (and ``z = B p[I]``) by atom j in slot ``k``, given ``g = G[I, j]``,
        ``gjj = G[j, j]`` and ``pj = p[j]``, for the vectors where ``ok`` holds and j is not
        (numerically) in the span of ``I``. The others get an identity row and ``z_k = 0``,
        so their coefficient for the slot comes out exactly 0. Returns ``(B, z, active)``."""
        w = tl.sum(B * g[:, None, :], axis=2)  # L^{-1} G[I, j], indexed by i
        delta2 = gjj - tl.sum(w * w, axis=1)
        active = ok & (delta2 > DEP_TOL * gjj)
        inv_delta = 1.0 / tl.sqrt(tl.maximum(delta2, 1e-30))
        u = tl.sum(B * w[:, :, None], axis=1)  # w^T L^{-1}, indexed by t
        new_row = tl.where(slot_2d < k, -u * inv_delta[:, None], 0.0)
        new_row = tl.where(slot_2d == k, inv_delta[:, None], new_row)
        new_row = tl.where(active[:, None], new_row, tl.where(slot_2d == k, 1.0, 0.0))
        B = tl.where(slot_row == k, new_row[:, None, :], B)
        zk = tl.where(active, (pj - tl.sum(w * z, axis=1)) * inv_delta, 0.0)
        z = tl.where(slot_2d == k, zk[:, None], z)
        return B, z, active

    @triton.jit
    def _slot(t, i, slot_2d):
        """Column ``i`` of a per-vector state array ``t (BLOCK_M, S_PAD)``."""
        return tl.sum(tl.where(slot_2d == i, t, 0), axis=1)

    @triton.jit
    def _atom_rows(dt_ptr, atoms, DIM, offs_d, md_ok):
        """Rows ``D[:, atoms]^T`` ``(BLOCK_M, D_PAD)`` fp32 from the transposed dictionary."""
        return tl.load(
            dt_ptr + atoms.to(tl.int64)[:, None] * DIM + offs_d[None, :], mask=md_ok, other=0.0
        )

    @triton.jit
    def _omp_kernel(
        x_ptr,  # (M, DIM) fp32
        d_ptr,  # (DIM, N) fp32 dictionary
        g_ptr,  # (N, N) fp32 Gram matrix
        p_ptr,  # (M, N) fp32 scratch for p = D^T x (too long for registers)
        idx_ptr,  # (M, S) int64 out
        coef_ptr,  # (M, S) fp32 out
        err_ptr,  # (M, S) fp32 out
        M,
        N,
        DIM,
        tol,
        # S: the step loop bound and the length of every per-vector state array; register
        # arrays need a compile-time shape.
        S: tl.constexpr,
        # S_PAD: power-of-two padding of S (tl.arange sizes must be powers of two).
        S_PAD: tl.constexpr,
        # D_PAD: power-of-two >= max(16, DIM): the x block is held in registers and tl.dot
        # needs a static inner size of at least 16.
        D_PAD: tl.constexpr,
        # BLOCK_M / BLOCK_N: tile shapes (vectors per program, atoms per streamed tile).
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        # HAS_TOL: compiles the early-stop test out when no tolerance is given.
        HAS_TOL: tl.constexpr,
        # DEP_TOL: fixed numerical threshold, folded into the code.
        DEP_TOL: tl.constexpr,
    ):
        # One program handles BLOCK_M vectors rather than one: each streamed tile of D is
        # then reused by BLOCK_M vectors through tl.dot, and the per-vector control flow of
        # OMP (which atom, when to stop) becomes lane masks over the block instead of
        # branches. The small s x s state lives in (BLOCK_M, S_PAD, S_PAD) registers.
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        rows = offs_m.to(tl.int64)
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < DIM
        slots = tl.arange(0, S_PAD)
        slot_row = slots[None, :, None]  # B[m, i, t]: index i
        slot_2d = slots[None, :]

        x = tl.load(
            x_ptr + rows[:, None] * DIM + offs_d[None, :],
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        xx = tl.sum(x * x, axis=1)
        # 1 = this vector takes no more atoms (zero vector, padding row, converged, stuck).
        done = tl.where(xx > 0.0, 0, 1)
        safe_xx = tl.where(xx > 0.0, xx, 1.0)

        # Pass 0: p = D^T x, tile by tile, keeping the running argmax of |p|.
        best_val = tl.full([BLOCK_M], -1.0, tl.float32)
        best_idx = tl.zeros([BLOCK_M], tl.int32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            dt = tl.load(
                d_ptr + offs_d[:, None] * N + offs_n[None, :],
                mask=d_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            # ieee: TF32 would perturb p by ~1e-3 and change which atoms are picked.
            p = tl.dot(x, dt, input_precision="ieee")
            tl.store(
                p_ptr + rows[:, None] * N + offs_n[None, :], p, mask=m_ok[:, None] & n_ok[None, :]
            )
            score = tl.where(n_ok[None, :], tl.abs(p), -1.0)
            tile_val = tl.max(score, axis=1)
            tile_arg = tl.argmax(score, axis=1) + n0
            # Strict '>' keeps the earliest tile on ties, i.e. the lowest index, like torch.
            upd = tile_val > best_val
            best_val = tl.where(upd, tile_val, best_val)
            best_idx = tl.where(upd, tile_arg, best_idx)
        # p is re-read below by other threads of this program.
        tl.debug_barrier()

        B = tl.zeros([BLOCK_M, S_PAD, S_PAD], tl.float32)  # inverse Cholesky factor
        z = tl.zeros([BLOCK_M, S_PAD], tl.float32)  # B p[I]
        a = tl.zeros([BLOCK_M, S_PAD], tl.float32)  # coefficients B^T z
        idx = tl.zeros([BLOCK_M, S_PAD], tl.int32)
        for k in range(0, S):
            j = best_idx
            j64 = j.to(tl.int64)
            prev = (slot_2d < k) & m_ok[:, None]
            g = tl.load(g_ptr + idx.to(tl.int64) * N + j64[:, None], mask=prev, other=0.0)
            gjj = tl.load(g_ptr + j64 * N + j64, mask=m_ok, other=1.0)
            pj = tl.load(p_ptr + rows * N + j64, mask=m_ok, other=0.0)
            B, z, active = _chol_extend(B, z, g, gjj, pj, done == 0, k, slot_2d, slot_row, DEP_TOL)
            idx = tl.where(slot_2d == k, tl.where(active, j, 0)[:, None], idx)
            done = tl.where(active, done, 1)
            a = tl.sum(B * z[:, :, None], axis=1)
            r2 = tl.maximum(xx - tl.sum(z * z, axis=1), 0.0)
            rel = tl.where(xx > 0.0, tl.sqrt(r2 / safe_xx), 0.0)
            tl.store(err_ptr + rows * S + k, rel, mask=m_ok)
            if HAS_TOL:
                done = tl.where(rel <= tol, 1, done)
            if k + 1 < S:
                # c = p - G[:, I] a, streamed over atoms, with the next argmax.
                live = (slots < k + 1)[None, :, None]
                idx3 = idx.to(tl.int64)[:, :, None]
                a3 = a[:, :, None]
                best_val = tl.full([BLOCK_M], -1.0, tl.float32)
                best_idx = tl.zeros([BLOCK_M], tl.int32)
                for n0 in range(0, N, BLOCK_N):
                    offs_n = n0 + tl.arange(0, BLOCK_N)
                    n_ok = offs_n < N
                    p = tl.load(
                        p_ptr + rows[:, None] * N + offs_n[None, :],
                        mask=m_ok[:, None] & n_ok[None, :],
                        other=0.0,
                    )
                    on3 = offs_n[None, None, :]
                    grow = tl.load(
                        g_ptr + idx3 * N + on3,
                        mask=live & (on3 < N) & m_ok[:, None, None],
                        other=0.0,
                    )
                    c = p - tl.sum(a3 * grow, axis=1)
                    hit = tl.max(tl.where(live & (idx3 == on3), 1, 0), axis=1)
                    score = tl.where(n_ok[None, :] & (hit == 0), tl.abs(c), -1.0)
                    tile_val = tl.max(score, axis=1)
                    tile_arg = tl.argmax(score, axis=1) + n0
                    upd = tile_val > best_val
                    best_val = tl.where(upd, tile_val, best_val)
                    best_idx = tl.where(upd, tile_arg, best_idx)

        out = rows[:, None] * S + slot_2d
        out_ok = m_ok[:, None] & (slot_2d < S)
        tl.store(idx_ptr + out, idx.to(tl.int64), mask=out_ok)
        tl.store(coef_ptr + out, a, mask=out_ok)

    # ------------------------------------------------------------------------------------
    # GEMM variant: two kernels per step. _omp_kernel updates c = p - G[:, I] a through Gram
    # rows: (k + 1) N floats per vector and step, none shared between vectors (at N = 4096
    # the 64 MiB Gram matrix is read from HBM). Here each step
    #   1. _omp_corr_kernel: correlations of every residual with every atom, D^T r, as a
    #      tensor-core GEMM (K = d, small), each dictionary tile shared by BLOCK_M vectors,
    #      with the argmax over atoms fused (the (M, N) product is never written);
    #   2. _omp_step_kernel: per vector, the inverse-Cholesky update for the chosen atom
    #      (G[I, j] as dot products of gathered atom rows, so no Gram matrix), the fp32
    #      least-squares coefficients, and the next residual r = x - D[:, I] a.
    # Only the choice of atoms sees the correlation dtype; coefficients are fp32.
    # ------------------------------------------------------------------------------------

    @triton.jit(do_not_specialize=["M"])
    def _omp_corr_kernel(
        r_ptr,  # (M, D_PAD) residuals in the correlation dtype, zero beyond DIM
        dc_ptr,  # (D_PAD, N) dictionary in the correlation dtype, zero rows beyond DIM
        j_ptr,  # (M,) int32 out: argmax_n |D[:, n]^T r| (lowest index on ties)
        jval_ptr,  # (M,) fp32 out: that |correlation|
        M,
        N,
        D_PAD: tl.constexpr,  # padded head dim (tl.dot inner size, >= 16)
        BLOCK_M: tl.constexpr,  # vectors per program
        BLOCK_N: tl.constexpr,  # atoms per streamed tile
        PREC: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 correlations)
        # Triton's CPU interpreter multiplies bf16 tiles wrongly (Triton 3.9: off by 1e10);
        # there the bf16 operands are multiplied in fp32: the same exact products.
        UPCAST_DOT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        rows = offs_m.to(tl.int64)
        offs_d = tl.arange(0, D_PAD)
        r = tl.load(r_ptr + rows[:, None] * D_PAD + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        best_val = tl.full([BLOCK_M], -1.0, tl.float32)
        best_idx = tl.zeros([BLOCK_M], tl.int32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            dt = tl.load(
                dc_ptr + offs_d[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0.0
            )
            if UPCAST_DOT:
                c = tl.dot(r.to(tl.float32), dt.to(tl.float32), input_precision="ieee")
            else:
                c = tl.dot(r, dt, input_precision=PREC)
            score = tl.where(n_ok[None, :], tl.abs(c), -1.0)
            tile_val = tl.max(score, axis=1)
            tile_arg = tl.argmax(score, axis=1) + n0
            upd = tile_val > best_val  # strict: the earliest tile wins ties, like torch
            best_val = tl.where(upd, tile_val, best_val)
            best_idx = tl.where(upd, tile_arg, best_idx)
        tl.store(j_ptr + rows, best_idx, mask=m_ok)
        tl.store(jval_ptr + rows, best_val, mask=m_ok)

    @triton.jit(do_not_specialize=["M", "k"])
    def _omp_step_kernel(
        x_ptr,  # (M, DIM) fp32
        dt_ptr,  # (N, DIM) fp32 dictionary, transposed: one contiguous row per atom
        r_ptr,  # (M, D_PAD) out: next residual (correlation dtype)
        rn_ptr,  # (M,) fp32 in/out: ||r||
        j_ptr,  # (M,) int32: the atom _omp_corr_kernel chose
        jval_ptr,  # (M,) fp32: its |correlation|
        b_ptr,  # (M, S_PAD, S_PAD) fp32 state: inverse Cholesky factor of G[I, I]
        z_ptr,  # (M, S_PAD) fp32 state: B p[I]
        done_ptr,  # (M,) int32 state: 1 = takes no more atoms
        idx_ptr,  # (M, S) int64 out
        coef_ptr,  # (M, S) fp32 out (rewritten every step)
        err_ptr,  # (M, S) fp32 out
        M,
        N,
        DIM,
        k,  # this step (slot) index
        tol,
        S: tl.constexpr,
        S_PAD: tl.constexpr,
        D_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        HAS_TOL: tl.constexpr,
        DEP_TOL: tl.constexpr,
        # An atom is taken only if |corr| > CORR_FLOOR * ||r||: chosen atoms correlate with
        # the residual at rounding level only (it is orthogonal to them), so the floor keeps
        # them from being chosen again without an exclusion mask in the GEMM.
        CORR_FLOOR: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        rows = offs_m.to(tl.int64)
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < DIM
        md_ok = m_ok[:, None] & d_ok[None, :]
        slots = tl.arange(0, S_PAD)
        slot_2d = slots[None, :]
        slot_row = slots[None, :, None]
        ms_ok = m_ok[:, None] & (slot_2d < S)

        x = tl.load(x_ptr + rows[:, None] * DIM + offs_d[None, :], mask=md_ok, other=0.0)
        xx = tl.sum(x * x, axis=1)
        safe_xx = tl.where(xx > 0.0, xx, 1.0)
        done = tl.load(done_ptr + rows, mask=m_ok, other=1)
        j = tl.load(j_ptr + rows, mask=m_ok, other=0)
        jval = tl.load(jval_ptr + rows, mask=m_ok, other=0.0)
        rn = tl.load(rn_ptr + rows, mask=m_ok, other=0.0)
        b_off = (rows[:, None, None] * S_PAD + slot_row) * S_PAD + slots[None, None, :]
        B = tl.load(b_ptr + b_off, mask=m_ok[:, None, None], other=0.0)
        z = tl.load(z_ptr + rows[:, None] * S_PAD + slot_2d, mask=m_ok[:, None], other=0.0)
        idx = tl.load(idx_ptr + rows[:, None] * S + slot_2d, mask=ms_ok, other=0)

        dj = _atom_rows(dt_ptr, j, DIM, offs_d, md_ok)
        pj = tl.sum(dj * x, axis=1)  # p[j] = D[:, j]^T x
        gjj = tl.sum(dj * dj, axis=1)
        g = tl.zeros([BLOCK_M, S_PAD], tl.float32)  # G[I, j] = D[:, I]^T D[:, j]
        for i in range(0, k):
            d_i = _atom_rows(dt_ptr, _slot(idx, i, slot_2d), DIM, offs_d, md_ok)
            g = tl.where(slot_2d == i, tl.sum(d_i * dj, axis=1)[:, None], g)
        ok = (done == 0) & (jval > CORR_FLOOR * rn)
        B, z, active = _chol_extend(B, z, g, gjj, pj, ok, k, slot_2d, slot_row, DEP_TOL)
        idx = tl.where(slot_2d == k, tl.where(active, j, 0).to(tl.int64)[:, None], idx)
        done = tl.where(active, done, 1)
        a = tl.sum(B * z[:, :, None], axis=1)  # coefficients B^T z
        r2 = tl.maximum(xx - tl.sum(z * z, axis=1), 0.0)
        rel = tl.where(xx > 0.0, tl.sqrt(r2 / safe_xx), 0.0)
        if HAS_TOL:
            done = tl.where(rel <= tol, 1, done)
        tl.store(err_ptr + rows * S + k, rel, mask=m_ok)
        tl.store(b_ptr + b_off, B, mask=m_ok[:, None, None])
        tl.store(z_ptr + rows[:, None] * S_PAD + slot_2d, z, mask=m_ok[:, None])
        tl.store(idx_ptr + rows[:, None] * S + slot_2d, idx, mask=ms_ok)
        tl.store(coef_ptr + rows[:, None] * S + slot_2d, a, mask=ms_ok)
        tl.store(done_ptr + rows, done, mask=m_ok)
        if k + 1 < S:
            # the next residual r = x - D[:, I] a, one gathered atom row per slot
            r = x
            for i in range(0, k + 1):
                d_i = _atom_rows(dt_ptr, _slot(idx, i, slot_2d), DIM, offs_d, md_ok)
                r = r - _slot(a, i, slot_2d)[:, None] * d_i
            tl.store(rn_ptr + rows, tl.sqrt(tl.sum(r * r, axis=1)), mask=m_ok)
            tl.store(
                r_ptr + rows[:, None] * D_PAD + offs_d[None, :],
                r.to(r_ptr.dtype.element_ty),
                mask=m_ok[:, None],
            )


def _interpreted() -> bool:
    """Whether this process runs Triton kernels in the interpreter.

    ``triton.jit`` chooses interpreter or compiler when a function is decorated, and
    ``tl.sum`` & co. are decorated when triton itself is imported, so ``TRITON_INTERPRET=1``
    must be in the environment before the first ``import triton``; setting it later has no
    effect on this process.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_omp_kernel, InterpretedFunction)


# Launch defaults, chosen from ptxas -v on sm_90 at d = 128 (not yet timed): the Gram
# kernel's 16 vectors x 16 atoms per tile, 8 warps up to s = 16 and 16 beyond, no spills;
# the GEMM variant's correlation tiles of 128 vectors x 128 atoms on 8 warps (wgmma, 119
# registers; 64 x 128 on 4 warps spills) and step programs of 16 vectors on 4 warps (185
# registers at s = 8, 236 at s = 16, no spills; 32 vectors spill).
_GRAM_LAUNCH = (16, 16)
_GEMM_LAUNCH = dict(corr_m=128, corr_n=128, corr_warps=8, step_m=16, step_warps=4)
# The GEMM variant's correlation floor (see _omp_step_kernel), relative to ||r||: bf16
# rounding leaves chosen atoms near 1e-4 ||r|| (d = 128); 2^-7 is far above that, and an
# atom below it would remove under 0.01% of the residual energy.
_CORR_FLOOR = {"bfloat16": 2.0**-7, "float32": 0.0}
ALGORITHMS = ("gram", "gemm")


def omp_triton(
    x: torch.Tensor,
    D: torch.Tensor,
    s: int,
    gram: torch.Tensor | None = None,
    tol: float | None = None,
    return_errors: bool = False,
    algorithm: str = "gram",
    corr_dtype: str = "bfloat16",
    **launch,
):
    """OMP with Triton kernels; same arguments and results as :func:`omp_ref`.

    Runs compiled on CUDA tensors and in the Triton interpreter on CPU tensors (slow; for
    tests). Atom choices may differ from the reference only where two correlations tie to
    within rounding (or, with bf16 correlations, nearly tie).

    ``algorithm``:

    * ``"gram"`` -- one kernel, the reference's algorithm: ``p = D^T x`` once, then
      correlations updated through rows of ``G``. Measured on an H100: 0.61 M vectors/s at
      s = 8, N = 4096, d = 128 (every vector and step reads ``k + 1`` Gram rows; at
      N = 4096 ``G`` is 64 MiB, past L2).
    * ``"gemm"`` -- two kernels per step: the correlations of every residual with every
      atom as one tensor-core GEMM with a fused argmax, in ``corr_dtype`` (``"bfloat16"``,
      or ``"float32"`` with IEEE products, which picks the reference's atoms), then the
      per-vector least-squares update and next residual in fp32. Needs no Gram matrix
      (``gram`` is ignored). Not yet timed on a GPU: ``scripts/bench_omp_gpu.py``.

    ``launch`` overrides tile sizes: ``block_m``, ``block_n``, ``num_warps`` for ``gram``;
    the keys of ``_GEMM_LAUNCH`` for ``gemm``.
    """
    if triton is None:
        raise RuntimeError("omp_triton needs triton; use omp_ref")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "gemm" and corr_dtype not in _CORR_FLOOR:
        raise ValueError(f"corr_dtype must be one of {sorted(_CORR_FLOOR)}, got {corr_dtype!r}")
    x2, Df, G, lead = _prepare(x, D, s, gram, need_gram=algorithm == "gram")
    x2 = x2.contiguous()
    M = x2.shape[0]
    dev = x2.device
    idx = torch.zeros(M, s, dtype=torch.int64, device=dev)
    coef = torch.zeros(M, s, dtype=torch.float32, device=dev)
    err = torch.zeros(M, s, dtype=torch.float32, device=dev)
    if M:
        if dev.type == "cpu" and not _interpreted():
            raise RuntimeError(
                "omp_triton got CPU tensors but Triton is in compiled mode: set "
                "TRITON_INTERPRET=1 before triton is first imported, or use omp_ref"
            )
        args = (x2, Df.contiguous(), idx, coef, err, s, tol)
        if algorithm == "gram":
            _launch_gram(*args, G.contiguous(), **launch)
        else:
            _launch_gemm(*args, corr_dtype, **launch)
    return _finish(idx, coef, err, lead, s, return_errors)


def _launch_gram(x2, Df, idx, coef, err, s, tol, G, block_m=None, block_n=None, num_warps=None):
    M = x2.shape[0]
    d, n_atoms = Df.shape
    block_m = block_m or _GRAM_LAUNCH[0]
    block_n = block_n or _GRAM_LAUNCH[1]
    num_warps = num_warps or (8 if s <= 16 else 16)
    step = max(block_m, (_WORKSPACE_BYTES // (4 * n_atoms)) // block_m * block_m)
    step = min(step, triton.cdiv(M, block_m) * block_m)
    scratch = torch.empty(step, n_atoms, dtype=torch.float32, device=x2.device)
    for start in range(0, M, step):
        m = min(step, M - start)
        _omp_kernel[(triton.cdiv(m, block_m),)](
            x2[start:], Df, G, scratch, idx[start:], coef[start:], err[start:], m, n_atoms, d,
            float(tol) if tol is not None else 0.0,
            S=s, S_PAD=max(2, _next_pow2(s)), D_PAD=max(16, _next_pow2(d)), BLOCK_M=block_m,
            BLOCK_N=block_n, HAS_TOL=tol is not None, DEP_TOL=DEP_EPS, num_warps=num_warps,
        )  # fmt: skip


def _launch_gemm(x2, Df, idx, coef, err, s, tol, corr_dtype, **launch):
    unknown = set(launch) - set(_GEMM_LAUNCH)
    if unknown:
        raise TypeError(f"unknown launch settings for gemm: {sorted(unknown)}")
    cfg = {**_GEMM_LAUNCH, **launch}
    M = x2.shape[0]
    d, n_atoms = Df.shape
    dev = x2.device
    d_pad, s_pad = max(16, _next_pow2(d)), max(2, _next_pow2(s))
    cdt = torch.bfloat16 if corr_dtype == "bfloat16" else torch.float32
    dc = torch.zeros(d_pad, n_atoms, dtype=cdt, device=dev)
    dc[:d] = Df
    dt = Df.T.contiguous()
    # per-vector state, reused chunk by chunk: residual, ||r||, factor, z, done, argmax
    per_vec = d_pad * cdt.itemsize + 4 * (s_pad * s_pad + s_pad + 4)
    step = max(cfg["corr_m"], _WORKSPACE_BYTES // per_vec // cfg["corr_m"] * cfg["corr_m"])
    step = min(step, M)
    R = torch.zeros(step, d_pad, dtype=cdt, device=dev)
    rn = torch.empty(step, dtype=torch.float32, device=dev)
    B = torch.empty(step, s_pad, s_pad, dtype=torch.float32, device=dev)
    z = torch.empty(step, s_pad, dtype=torch.float32, device=dev)
    done = torch.empty(step, dtype=torch.int32, device=dev)
    j = torch.empty(step, dtype=torch.int32, device=dev)
    jval = torch.empty(step, dtype=torch.float32, device=dev)
    interp = dev.type == "cpu"
    for start in range(0, M, step):
        m = min(step, M - start)
        xs = x2[start : start + m]
        R[:m, :d] = xs
        torch.linalg.vector_norm(xs, dim=1, out=rn[:m])
        B.zero_()
        z.zero_()
        done[:m] = rn[:m] == 0
        grid_c = (triton.cdiv(m, cfg["corr_m"]),)
        grid_s = (triton.cdiv(m, cfg["step_m"]),)
        for k in range(s):
            _omp_corr_kernel[grid_c](
                R, dc, j, jval, m, n_atoms, D_PAD=d_pad, BLOCK_M=cfg["corr_m"],
                BLOCK_N=cfg["corr_n"], PREC="ieee" if cdt == torch.float32 else "tf32",
                UPCAST_DOT=interp and cdt == torch.bfloat16, num_warps=cfg["corr_warps"],
            )  # fmt: skip
            _omp_step_kernel[grid_s](
                xs, dt, R, rn, j, jval, B, z, done, idx[start:], coef[start:], err[start:], m,
                n_atoms, d, k, float(tol) if tol is not None else 0.0, S=s, S_PAD=s_pad,
                D_PAD=d_pad, BLOCK_M=cfg["step_m"], HAS_TOL=tol is not None, DEP_TOL=DEP_EPS,
                CORR_FLOOR=_CORR_FLOOR[corr_dtype], num_warps=cfg["step_warps"],
            )  # fmt: skip


def omp(
    x: torch.Tensor,
    D: torch.Tensor,
    s: int,
    gram: torch.Tensor | None = None,
    tol: float | None = None,
    return_errors: bool = False,
):
    """Dispatch: the Triton kernel for CUDA tensors when Triton imports, :func:`omp_cpu` for
    CPU tensors, else :func:`omp_ref`.

    Shapes as in :func:`omp_ref`: ``x (M, d)``, ``D (d, N)`` -> ``idx (M, s)`` int64,
    ``coef (M, s)`` float32 (and ``rel_err (M, s)`` with ``return_errors``).
    """
    if triton is not None and x.is_cuda:
        return omp_triton(x, D, s, gram=gram, tol=tol, return_errors=return_errors)
    if x.device.type == "cpu":
        return omp_cpu(x, D, s, gram=gram, tol=tol, return_errors=return_errors)
    return omp_ref(x, D, s, gram=gram, tol=tol, return_errors=return_errors)
