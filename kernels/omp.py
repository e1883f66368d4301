"""Batched orthogonal matching pursuit (OMP) over a fixed dictionary.

A vector ``x`` (length ``d``) is approximated by ``s`` atoms (columns) of a dictionary
``D`` of shape ``(d, N)`` with unit-norm columns::

    x ~= sum_j coef[j] * D[:, idx[j]]

Both implementations follow the same "Gram" variant of OMP, whose cost per vector is
``O(N d + s^2 N)`` instead of the ``O(s N d)`` of recomputing ``D^T r`` every step:

* ``p = D^T x`` once;
* ``s`` times: pick the not-yet-chosen atom with the largest ``|c|`` (``c = p`` at first),
  extend the inverse Cholesky factor ``B = L^{-1}`` of ``G[I, I]`` (``G = D^T D``) by one
  row, get the coefficients ``a = B^T B p[I]`` and update ``c = p - G[:, I] a``.

The inverse factor (rather than ``L``) turns both triangular solves of each step into
plain matrix-vector products, which batch well in torch and need no dynamic indexing in
Triton. ``z = B p[I]`` also gives the residual for free: ``||r||^2 = ||x||^2 - ||z||^2``.

A vector stops early (its remaining slots get ``idx 0`` and ``coef 0``, so every vector
keeps ``s`` slots) when it is zero, when ``tol`` is given and its relative residual is
``<= tol``, or when the atom it would add is (numerically) in the span of those it already
has, which would make the Cholesky factor singular.

This module is copied flat into exported checkpoints: it imports only torch and the
standard library, and Triton lazily, so it imports (and the reference runs) without it.
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

__all__ = ["omp", "omp_ref", "omp_triton", "reconstruct", "HAS_TRITON"]

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


def _prepare(x: torch.Tensor, D: torch.Tensor, s: int, gram: torch.Tensor | None):
    """Check shapes and return ``(x2 (M, d) fp32, D (d, N) fp32, G (N, N) fp32, lead)``."""
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
        G = Df.T @ Df
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
    M, n_atoms = x2.shape[0], Df.shape[1]
    idx = torch.zeros(M, s, dtype=torch.int64, device=x2.device)
    coef = torch.zeros(M, s, dtype=torch.float32, device=x2.device)
    err = torch.zeros(M, s, dtype=torch.float32, device=x2.device)
    budget = _CPU_WORKSPACE_BYTES if x2.device.type == "cpu" else _WORKSPACE_BYTES
    step = max(1, min(chunk, max(_MIN_CHUNK, budget // (4 * (s + 4) * n_atoms))))
    for start in range(0, M, step):
        sl = slice(start, min(start + step, M))
        idx[sl], coef[sl], err[sl] = _omp_chunk(x2[sl], Df, G, s, tol)
    return _finish(idx, coef, err, lead, s, return_errors)


def _omp_chunk(x: torch.Tensor, D: torch.Tensor, G: torch.Tensor, s: int, tol: float | None):
    m = x.shape[0]
    dev = x.device
    rows = torch.arange(m, device=dev)
    p = x @ D  # (m, N)
    xx = (x * x).sum(1)
    done = xx <= 0
    B = torch.zeros(m, s, s, device=dev)  # inverse Cholesky factor of G[I, I]
    z = torch.zeros(m, s, device=dev)  # B @ p[I]
    a = torch.zeros(m, 0, device=dev)
    idx = torch.zeros(m, s, dtype=torch.int64, device=dev)
    picked = torch.zeros(m, s, dtype=torch.int64, device=dev)  # idx before zeroing stopped slots
    err = torch.zeros(m, s, device=dev)
    # Gram rows of the chosen atoms, gathered once each so that the correlation update is a
    # single batched product per step.
    grows = torch.empty(m, s, G.shape[1], device=dev)
    safe_xx = torch.where(done, torch.ones_like(xx), xx)
    score = p.abs()
    for k in range(s):
        if k:
            # Chosen atoms have c ~ 0 but not exactly; exclude them explicitly.
            score.scatter_(1, picked[:, :k], -1.0)
        j = score.argmax(1)
        picked[:, k] = j
        gjj = G[j, j]
        g = grows[:, :k].gather(2, j.view(m, 1, 1).expand(m, k, 1)).squeeze(2)  # G[I, j]
        w = torch.bmm(B[:, :k, :k], g.unsqueeze(2)).squeeze(2)  # L^{-1} G[I, j]
        delta2 = gjj - (w * w).sum(1)
        active = ~done & (delta2 > DEP_EPS * gjj)
        inv_delta = torch.rsqrt(delta2.clamp_min(1e-30))
        u = torch.bmm(w.unsqueeze(1), B[:, :k, :k]).squeeze(1)
        # Inactive rows get an identity row with z_k = 0: the factor stays invertible and
        # their coefficient for this slot comes out exactly 0.
        B[:, k, :k] = torch.where(active.unsqueeze(1), -u * inv_delta.unsqueeze(1), 0.0)
        B[:, k, k] = torch.where(active, inv_delta, 1.0)
        pj = p[rows, j]
        z[:, k] = torch.where(active, (pj - (w * z[:, :k]).sum(1)) * inv_delta, 0.0)
        idx[:, k] = torch.where(active, j, 0)
        grows[:, k] = G[j]
        done |= ~active
        a = torch.bmm(z[:, None, : k + 1], B[:, : k + 1, : k + 1]).squeeze(1)  # B^T z
        # Summed over all s slots (zeros beyond k) so a stopped vector's value is bit-stable.
        r2 = (xx - (z * z).sum(1)).clamp_min(0.0)
        err[:, k] = torch.where(xx > 0, torch.sqrt(r2 / safe_xx), 0.0)
        if tol is not None:
            done |= err[:, k] <= tol
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
    return idx, a, err


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
            w = tl.sum(B * g[:, None, :], axis=2)  # L^{-1} G[I, j], indexed by i
            delta2 = gjj - tl.sum(w * w, axis=1)
            active = (done == 0) & (delta2 > DEP_TOL * gjj)
            inv_delta = 1.0 / tl.sqrt(tl.maximum(delta2, 1e-30))
            u = tl.sum(B * w[:, :, None], axis=1)  # w^T L^{-1}, indexed by t
            new_row = tl.where(slot_2d < k, -u * inv_delta[:, None], 0.0)
            new_row = tl.where(slot_2d == k, inv_delta[:, None], new_row)
            # Inactive lanes get an identity row and z_k = 0: their coefficients stay as
            # they were and this slot's comes out exactly 0.
            new_row = tl.where(active[:, None], new_row, tl.where(slot_2d == k, 1.0, 0.0))
            B = tl.where(slot_row == k, new_row[:, None, :], B)
            zk = tl.where(active, (pj - tl.sum(w * z, axis=1)) * inv_delta, 0.0)
            z = tl.where(slot_2d == k, zk[:, None], z)
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


def _interpreted() -> bool:
    """Whether this process runs Triton kernels in the interpreter.

    ``triton.jit`` chooses interpreter or compiler when a function is decorated, and
    ``tl.sum`` & co. are decorated when triton itself is imported, so ``TRITON_INTERPRET=1``
    must be in the environment before the first ``import triton``; setting it later has no
    effect on this process.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_omp_kernel, InterpretedFunction)


def omp_triton(
    x: torch.Tensor,
    D: torch.Tensor,
    s: int,
    gram: torch.Tensor | None = None,
    tol: float | None = None,
    return_errors: bool = False,
    block_m: int = 16,
    block_n: int = 16,
    num_warps: int | None = None,
):
    """OMP as one Triton kernel; same arguments and results as :func:`omp_ref`.

    Runs compiled on CUDA tensors and in the Triton interpreter on CPU tensors (slow; for
    tests). Atom choices may differ from the reference only where two correlations tie to
    within rounding.

    The defaults (16 vectors x 16 atoms per tile, 8 warps up to s = 16 and 16 warps
    beyond) were chosen from ``ptxas -v`` on sm_90: no register spills for s <= 16 at
    d = 128; they have not been timed on a GPU.
    """
    if triton is None:
        raise RuntimeError("omp_triton needs triton; use omp_ref")
    x2, Df, G, lead = _prepare(x, D, s, gram)
    x2 = x2.contiguous()
    Df = Df.contiguous()
    G = G.contiguous()
    M = x2.shape[0]
    d, n_atoms = Df.shape
    dev = x2.device
    idx = torch.zeros(M, s, dtype=torch.int64, device=dev)
    coef = torch.zeros(M, s, dtype=torch.float32, device=dev)
    err = torch.zeros(M, s, dtype=torch.float32, device=dev)
    if num_warps is None:
        num_warps = 8 if s <= 16 else 16
    if M:
        if dev.type == "cpu" and not _interpreted():
            raise RuntimeError(
                "omp_triton got CPU tensors but Triton is in compiled mode: set TRITON_INTERPRET=1 "
                "before triton is first imported, or use omp_ref"
            )
        step = max(block_m, (_WORKSPACE_BYTES // (4 * n_atoms)) // block_m * block_m)
        step = min(step, triton.cdiv(M, block_m) * block_m)
        scratch = torch.empty(step, n_atoms, dtype=torch.float32, device=dev)
        for start in range(0, M, step):
            m = min(step, M - start)
            grid = (triton.cdiv(m, block_m),)
            _omp_kernel[grid](
                x2[start:],
                Df,
                G,
                scratch,
                idx[start:],
                coef[start:],
                err[start:],
                m,
                n_atoms,
                d,
                float(tol) if tol is not None else 0.0,
                S=s,
                S_PAD=max(2, _next_pow2(s)),
                D_PAD=max(16, _next_pow2(d)),
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                HAS_TOL=tol is not None,
                DEP_TOL=DEP_EPS,
                num_warps=num_warps,
            )
    return _finish(idx, coef, err, lead, s, return_errors)


def omp(
    x: torch.Tensor,
    D: torch.Tensor,
    s: int,
    gram: torch.Tensor | None = None,
    tol: float | None = None,
    return_errors: bool = False,
):
    """Dispatch: the Triton kernel for CUDA tensors when Triton imports, else :func:`omp_ref`.

    Shapes as in :func:`omp_ref`: ``x (M, d)``, ``D (d, N)`` -> ``idx (M, s)`` int64,
    ``coef (M, s)`` float32 (and ``rel_err (M, s)`` with ``return_errors``).
    """
    if triton is not None and x.is_cuda:
        return omp_triton(x, D, s, gram=gram, tol=tol, return_errors=return_errors)
    return omp_ref(x, D, s, gram=gram, tol=tol, return_errors=return_errors)
