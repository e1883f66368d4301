"""Tests for kvsurgery.kernels.omp: the torch reference and the Triton kernel (interpreter)."""

import os

import torch  # importing torch does not import triton

# Compiled kernels where a GPU is; elsewhere Triton's interpreter, which must be chosen
# before the first `import triton` of the process (if another test module imported triton
# first, the kernel tests re-run in a fresh process).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from kvsurgery.kernels import omp as K  # noqa: E402

INTERPRETED = K.HAS_TRITON and K._interpreted()
# Kernel tests run in-process on CUDA tensors (compiled) or on CPU tensors (interpreter).
DEV = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
CAN_RUN_KERNEL = K.HAS_TRITON and (INTERPRETED or DEV == "cuda")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The two torch routes: the Gram reference and the CPU route (residual correlations as one
# product per step). Every test of the reference's semantics runs on both.
@pytest.fixture(params=["omp_ref", "omp_cpu"])
def torch_omp(request):
    return getattr(K, request.param)


def _dict(d, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(d, n, generator=g, dtype=torch.float64)
    return (D / D.norm(dim=0)).to(dtype)


def _sparse(m, D, s, seed=1):
    """x = D[:, support] @ coef with |coef| in [1, 2]: a well-separated s-sparse signal."""
    g = torch.Generator().manual_seed(seed)
    n = D.shape[1]
    support = torch.rand(m, n, generator=g).argsort(1)[:, :s]
    coef = (1 + torch.rand(m, s, generator=g)) * torch.randn(m, s, generator=g).sign()
    return K.reconstruct(support, coef, D), support, coef


def _lsq(A, b):
    """Least squares via the normal equations (fp64, small well-conditioned A)."""
    return torch.linalg.solve(A.T @ A, A.T @ b)


def _textbook_omp(x, D, s):
    """Plain OMP in fp64 with a least-squares solve per step (independent of the module)."""
    x, D = x.double(), D.double()
    out = []
    for v in x:
        r, chosen = v.clone(), []
        for _ in range(s):
            c = (D.T @ r).abs()
            c[chosen] = -1
            chosen.append(int(c.argmax()))
            sub = D[:, chosen]
            a = _lsq(sub, v)
            r = v - sub @ a
        out.append(chosen)
    return torch.tensor(out)


# d = 128 keeps the random dictionaries incoherent enough for OMP's recovery guarantee to
# hold on every row at s = 8 (at d = 64 a few rows already fail, in any OMP).
@pytest.mark.parametrize(
    "d,n,s", [(64, 128, 1), (64, 128, 3), (64, 300, 3), (64, 300, 5), (128, 128, 8), (128, 300, 8)]
)
def test_exact_recovery_of_sparse_signals(torch_omp, d, n, s):
    D = _dict(d, n)
    x, support, coef = _sparse(40, D, s)
    idx, got = torch_omp(x, D, s)
    order_true = support.argsort(1)
    order_got = idx.argsort(1)
    assert torch.equal(support.gather(1, order_true), idx.gather(1, order_got))
    torch.testing.assert_close(
        got.gather(1, order_got), coef.gather(1, order_true), atol=1e-4, rtol=1e-4
    )
    assert (K.reconstruct(idx, got, D) - x).norm(dim=1).max() < 1e-4 * x.norm(dim=1).min()


def test_lossless_with_a_full_basis(torch_omp):
    d = 16
    x = torch.randn(27, d, generator=torch.Generator().manual_seed(3))
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(4)))
    for D in (torch.eye(d), Q):
        idx, coef, err = torch_omp(x, D, d, return_errors=True)
        torch.testing.assert_close(K.reconstruct(idx, coef, D), x, atol=1e-5, rtol=1e-5)
        assert err[:, -1].max() < 1e-3
        # Each basis vector is used once.
        assert torch.equal(idx.sort(1).values, torch.arange(d).expand(27, d))


def test_identity_picks_largest_entries_in_order(torch_omp):
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5]])
    idx, coef = torch_omp(x, torch.eye(4), 2)
    assert idx.tolist() == [[1, 2]]
    assert coef.tolist() == [[-3.0, 2.0]]


@pytest.mark.parametrize("m", [27, 61])
@pytest.mark.parametrize("d,n", [(16, 37), (64, 128), (16, 300)])
@pytest.mark.parametrize("s", [1, 3, 8])
def test_matches_textbook_omp_on_odd_sizes(torch_omp, m, d, n, s):
    D = _dict(d, n, seed=d + n)
    x = torch.randn(m, d, generator=torch.Generator().manual_seed(m))
    idx, coef, err = torch_omp(x, D, s, return_errors=True)
    assert idx.shape == (m, s) and idx.dtype == torch.int64
    assert coef.shape == (m, s) and coef.dtype == torch.float32
    assert torch.equal(idx, _textbook_omp(x, D, s))
    # The tracked residual equals the one of the reconstruction, and never grows.
    x_hat = K.reconstruct(idx, coef, D)
    direct = (x - x_hat).norm(dim=1) / x.norm(dim=1)
    torch.testing.assert_close(err[:, -1], direct, atol=2e-4, rtol=1e-3)
    assert (err[:, 1:] <= err[:, :-1] + 1e-6).all()
    # Coefficients are the least-squares fit on the chosen atoms.
    for r in range(0, m, 13):
        sub = D[:, idx[r]].double()
        ls = _lsq(sub, x[r].double())
        torch.testing.assert_close(coef[r].double(), ls, atol=1e-4, rtol=1e-4)


def test_tol_stops_early_with_zero_slots(torch_omp):
    D = _dict(16, 64)
    x = torch.randn(61, 16, generator=torch.Generator().manual_seed(5))
    s, tol = 8, 0.4
    full_idx, full_coef, full_err = torch_omp(x, D, s, return_errors=True)
    idx, coef, err = torch_omp(x, D, s, tol=tol, return_errors=True)
    # First step at which each vector reaches the tolerance (s - 1 if never).
    reached = full_err <= tol
    assert reached.any(1).sum() > 10 and (~reached[:, 0]).sum() > 10  # the test means something
    first = torch.where(reached.any(1), reached.int().argmax(1), torch.full((61,), s - 1))
    for r in range(61):
        k = int(first[r]) + 1
        short_idx, short_coef = torch_omp(x[r : r + 1], D, k)
        assert torch.equal(idx[r, :k], full_idx[r, :k])
        assert torch.equal(idx[r, :k], short_idx[0])
        torch.testing.assert_close(coef[r, :k], short_coef[0])
        assert (idx[r, k:] == 0).all() and (coef[r, k:] == 0).all()
        assert (err[r, k:] == err[r, k - 1]).all()
    x_hat = K.reconstruct(idx, coef, D)
    stopped = reached.any(1)
    rel = (x - x_hat).norm(dim=1) / x.norm(dim=1)
    assert (rel[stopped] <= tol + 1e-5).all()


def test_zero_rows_and_chunking(torch_omp):
    D = _dict(16, 37)
    x = torch.randn(27, 16, generator=torch.Generator().manual_seed(6))
    x[[0, 5, 26]] = 0
    idx, coef, err = torch_omp(x, D, 3, return_errors=True)
    assert (coef[[0, 5, 26]] == 0).all() and (idx[[0, 5, 26]] == 0).all()
    assert (err[[0, 5, 26]] == 0).all()
    assert torch.isfinite(coef).all()
    alone_idx, alone_coef = torch_omp(x[1:5], D, 3)
    assert torch.equal(alone_idx, idx[1:5])
    torch.testing.assert_close(alone_coef, coef[1:5])
    small_idx, small_coef = torch_omp(x, D, 3, chunk=4)
    assert torch.equal(small_idx, idx)
    torch.testing.assert_close(small_coef, coef)


def test_dtypes_leading_dims_and_dispatch(monkeypatch):
    D = _dict(16, 37)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(7))
    idx, coef = K.omp_ref(x.to(torch.bfloat16), D, 3)
    assert idx.shape == (2, 5, 3) and coef.dtype == torch.float32
    idx2, coef2 = K.omp(x.to(torch.bfloat16).reshape(10, 16), D, 3)
    assert torch.equal(idx.reshape(10, 3), idx2)
    assert K.reconstruct(idx, coef, D).shape == (2, 5, 16)
    idx3, coef3 = K.omp_cpu(x.requires_grad_(), D.requires_grad_(), 3)  # no graph kept
    assert idx3.shape == (2, 5, 3) and not coef3.requires_grad
    x, D = x.detach(), D.detach()
    calls = []
    monkeypatch.setattr(K, "omp_cpu", lambda *a, **kw: calls.append(kw) or (None, None))
    K.omp(x.reshape(10, 16), D, 3, tol=0.5)  # CPU tensors -> the CPU route
    assert calls == [{"gram": None, "tol": 0.5, "return_errors": False}]


def test_cpu_route_agrees_with_reference_on_learned_like_data(monkeypatch):
    """A coherent dictionary (atoms near each other, as learned ones are) and vectors drawn
    near its atoms: the routes pick the same atoms with the same coefficients, with numpy's
    argmax and with torch's (the fallback without numpy)."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(32, 96, generator=g)
    D = base.repeat(1, 3) + 0.3 * torch.randn(32, 288, generator=g)
    D = D / D.norm(dim=0)
    x = K.reconstruct(torch.randint(0, 288, (300, 6), generator=g), torch.randn(300, 6), D)
    x = x + 0.05 * torch.randn(300, 32, generator=g)
    ref = K.omp_ref(x, D, 12, return_errors=True)
    cpu = K.omp_cpu(x, D, 12, return_errors=True)
    monkeypatch.setattr(K, "numpy", None)
    no_numpy = K.omp_cpu(x, D, 12, return_errors=True)
    for got in (cpu, no_numpy):
        assert (got[0] == ref[0]).all(1).float().mean() > 0.98  # fp32 near-ties may flip
        same = (got[0] == ref[0]).all(1)
        torch.testing.assert_close(got[1][same], ref[1][same], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[2], ref[2], atol=2e-3, rtol=1e-2)


def test_rejects_bad_shapes(torch_omp):
    D = _dict(16, 37)
    with pytest.raises(ValueError, match=r"s must be in \[1, N=37\]"):
        torch_omp(torch.randn(3, 16), D, 38)
    with pytest.raises(ValueError, match="last dimension 8 but D has d=16"):
        torch_omp(torch.randn(3, 8), D, 2)
    with pytest.raises(ValueError, match="gram must be"):
        torch_omp(torch.randn(3, 16), D, 2, gram=torch.eye(5))
    if torch_omp is K.omp_cpu:
        with pytest.raises(ValueError, match="omp_cpu takes CPU tensors, got x on meta"):
            torch_omp(torch.randn(3, 16, device="meta"), D, 2)


def test_dependent_atoms_stop_instead_of_nan(torch_omp):
    # Two copies of every atom: after d picks the rest are in the span.
    base = torch.eye(4)
    D = torch.cat([base, base, _dict(4, 3)], 1)
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(8))
    idx, coef = torch_omp(x, D, 7)
    assert torch.isfinite(coef).all()
    torch.testing.assert_close(K.reconstruct(idx, coef, D), x, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- Triton kernel (interpreter)

needs_kernel = pytest.mark.skipif(
    not CAN_RUN_KERNEL,
    reason="triton missing, or imported before TRITON_INTERPRET=1 (see the subprocess test)",
)


def _correlations(x, D, prefix):
    """|D^T r| for the least-squares residual of x on the atoms in prefix (fp64)."""
    x, D = x.double(), D.double()
    if prefix:
        sub = D[:, prefix]
        r = x - sub @ _lsq(sub, x)
    else:
        r = x
    return (D.T @ r).abs()


@needs_kernel
@pytest.mark.parametrize(
    "m,d,n,s,tol",
    [
        (27, 16, 37, 3, None),
        (61, 64, 128, 8, None),
        (61, 16, 300, 8, 0.3),
        (27, 64, 300, 1, None),
        (27, 16, 37, 8, 0.5),
        (17, 8, 20, 5, None),
    ],
)
@pytest.mark.parametrize("algorithm", ["gram", "gemm"])
def test_triton_matches_reference(m, d, n, s, tol, algorithm):
    """Both kernels against the reference; the GEMM variant with fp32 correlations, which
    must then pick the reference's atoms (its bf16 default is tested below)."""
    D = _dict(d, n, seed=n)
    x = torch.randn(m, d, generator=torch.Generator().manual_seed(m + s))
    x[3] = 0
    ref = K.omp_ref(x, D, s, tol=tol, return_errors=True)
    kw = dict(algorithm=algorithm, corr_dtype="float32")
    tri = K.omp_triton(x.to(DEV), D.to(DEV), s, tol=tol, return_errors=True, **kw)
    tri = [t.cpu() for t in tri]
    same = (ref[0] == tri[0]).all(1)
    for r in (~same).nonzero().flatten().tolist():
        # Only a near-tie may send the two down different paths.
        k = int((ref[0][r] != tri[0][r]).int().argmax())
        c = _correlations(x[r], D, ref[0][r, :k].tolist())
        a, b = int(ref[0][r, k]), int(tri[0][r, k])
        assert abs(c[a] - c[b]) <= 1e-5 * c.max(), f"row {r} step {k}: {c[a]} vs {c[b]}"
    assert same.float().mean() > 0.9
    torch.testing.assert_close(tri[1][same], ref[1][same], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri[2][same], ref[2][same], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        K.reconstruct(tri[0], tri[1], D)[same],
        K.reconstruct(*ref[:2], D)[same],
        atol=1e-4,
        rtol=1e-4,
    )
    assert (tri[1][3] == 0).all() and (tri[0][3] == 0).all()
    if tol is not None:
        assert (tri[1] == 0).any()  # some vector did stop early


KERNEL_VARIANTS = {
    "gram": dict(algorithm="gram"),
    "gemm-bf16": dict(algorithm="gemm", corr_dtype="bfloat16"),
    "gemm-fp32": dict(algorithm="gemm", corr_dtype="float32"),
}


@needs_kernel
@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
def test_triton_exact_recovery_and_ties(variant):
    kw = KERNEL_VARIANTS[variant]
    D = _dict(64, 128)
    x, support, coef = _sparse(20, D, 5)
    idx, got = K.omp_triton(x.to(DEV), D.to(DEV), 5, **kw)
    assert torch.equal(idx.cpu().sort(1).values, support.sort(1).values)
    order_true, order_got = support.argsort(1), idx.cpu().argsort(1)
    torch.testing.assert_close(
        got.cpu().gather(1, order_got), coef.gather(1, order_true), atol=1e-4, rtol=1e-4
    )
    # More slots than the support: the residual is ~0 after 5 atoms, the rest add nothing.
    idx8, got8 = K.omp_triton(x.to(DEV), D.to(DEV), 8, **kw)
    rec = K.reconstruct(idx8.cpu(), got8.cpu(), D)
    assert (rec - x).norm(dim=1).max() < 1e-4 * x.norm(dim=1).min()
    assert torch.equal(idx8[:, :5].cpu().sort(1).values, support.sort(1).values)
    # Exact ties (identity dictionary, equal entries) resolve to the lowest index, as in torch.
    xt = torch.tensor([[1.0, 2.0, 2.0, 1.0, 0.5] + [0.0] * 35])
    assert (
        K.omp_triton(xt.to(DEV), torch.eye(40, device=DEV), 3, **kw)[0].tolist()
        == K.omp_ref(xt, torch.eye(40), 3)[0].tolist()
    )


@needs_kernel
@pytest.mark.parametrize("variant", ["gemm-bf16", "gemm-fp32"])
def test_triton_gemm_full_basis_is_lossless(variant):
    """s = d on an orthonormal basis: every atom once, then the residual is zero. The GEMM
    kernel has no explicit mask of chosen atoms (they sit below its correlation floor);
    a re-picked atom would stop the vector early and leave x unreconstructed."""
    d = 16
    x = torch.randn(21, d, generator=torch.Generator().manual_seed(5))
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(6)))
    idx, coef, err = K.omp_triton(x.to(DEV), Q.to(DEV), d, return_errors=True,
                                  **KERNEL_VARIANTS[variant])  # fmt: skip
    idx, coef, err = idx.cpu(), coef.cpu(), err.cpu()
    assert torch.equal(idx.sort(1).values, torch.arange(d).expand(21, d))
    torch.testing.assert_close(K.reconstruct(idx, coef, Q), x, atol=1e-4, rtol=1e-4)
    assert err[:, -1].max() < 1e-3


@needs_kernel
def test_triton_gemm_bf16_codes_as_good_as_reference():
    """bf16 correlations may pick another atom at a near-tie, never a worse code: the final
    residual matches the reference's on average and row by row, and the coefficients are
    the exact least-squares fit on whatever atoms were chosen."""
    d, n, s, m = 64, 512, 8, 96
    D = _dict(d, n, seed=7)
    g = torch.Generator().manual_seed(8)
    # structured vectors (a few strong atoms plus noise), like keys and values
    x = K.reconstruct(torch.randint(0, n, (m, 4), generator=g), torch.randn(m, 4, generator=g), D)
    x = x + 0.3 * torch.randn(m, d, generator=g)
    ref = K.omp_ref(x, D, s, return_errors=True)
    got = [t.cpu() for t in K.omp_triton(x.to(DEV), D.to(DEV), s, return_errors=True,
                                         **KERNEL_VARIANTS["gemm-bf16"])]  # fmt: skip
    assert (got[0] == ref[0]).all(1).float().mean() > 0.8
    assert got[2][:, -1].mean() <= ref[2][:, -1].mean() * 1.01
    assert (got[2][:, -1] - ref[2][:, -1]).max() < 0.02
    for r in range(0, m, 7):
        sub = D[:, got[0][r]].double()
        torch.testing.assert_close(got[1][r].double(), _lsq(sub, x[r].double()), atol=1e-4,
                                   rtol=1e-4)  # fmt: skip
    rec = (K.reconstruct(got[0], got[1], D) - x).norm(dim=1) / x.norm(dim=1)
    torch.testing.assert_close(rec, got[2][:, -1], atol=1e-5, rtol=1e-4)


@needs_kernel
def test_triton_gemm_chunks_and_padding(monkeypatch):
    """Rows past one workspace chunk, d not a power of two, zero rows: same codes as one chunk."""
    d, n, s, m = 24, 70, 4, 300
    D = _dict(d, n, seed=9)
    x = torch.randn(m, d, generator=torch.Generator().manual_seed(10))
    x[[0, 150, 299]] = 0
    kw = dict(algorithm="gemm", corr_dtype="float32", return_errors=True)
    whole = [t.cpu() for t in K.omp_triton(x.to(DEV), D.to(DEV), s, **kw)]
    monkeypatch.setattr(K, "_WORKSPACE_BYTES", 1)  # one corr tile (128 rows) per chunk
    parts = [t.cpu() for t in K.omp_triton(x.to(DEV), D.to(DEV), s, **kw)]
    for a, b in zip(whole, parts, strict=True):
        assert torch.equal(a, b)
    ref = K.omp_ref(x, D, s, return_errors=True)
    assert (ref[0] == whole[0]).all(1).float().mean() > 0.95
    torch.testing.assert_close(whole[2], ref[2], atol=1e-4, rtol=1e-4)
    assert (whole[1][[0, 150, 299]] == 0).all() and (whole[2][[0, 150, 299]] == 0).all()


@needs_kernel
def test_triton_rejects_unknown_algorithm():
    x, D = torch.randn(4, 16), _dict(16, 32)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        K.omp_triton(x.to(DEV), D.to(DEV), 2, algorithm="fast")
    with pytest.raises(ValueError, match="corr_dtype must be one of"):
        K.omp_triton(x.to(DEV), D.to(DEV), 2, algorithm="gemm", corr_dtype="float16")


@pytest.mark.skipif(CAN_RUN_KERNEL or not K.HAS_TRITON, reason="kernel tests ran in-process")
def test_triton_in_fresh_interpreter_process():
    """When triton was imported in compiled mode before this module, run the kernel tests anew."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            __file__,
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "triton_",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


_COMPILE_SM90 = r"""
from kvsurgery.kernels.omp import (
    _CORR_FLOOR, _GEMM_LAUNCH, DEP_EPS, _omp_corr_kernel, _omp_kernel, _omp_step_kernel,
)

ptrs = dict(x_ptr="*fp32", d_ptr="*fp32", g_ptr="*fp32", p_ptr="*fp32", idx_ptr="*i64",
            coef_ptr="*fp32", err_ptr="*fp32")
for s, s_pad, d_pad, has_tol, warps in [(8, 8, 128, True, 8), (3, 4, 16, False, 8), (20, 32, 64, True, 16)]:
    consts = dict(S=s, S_PAD=s_pad, D_PAD=d_pad, BLOCK_M=16, BLOCK_N=16, HAS_TOL=has_tol,
                  DEP_TOL=DEP_EPS)
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n == "tol" else "i32")
           for n in _omp_kernel.arg_names}
    src = ASTSource(fn=_omp_kernel, signature=sig, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert "cubin" in k.asm
for d_pad, cdt, prec in [(128, "*bf16", "tf32"), (16, "*fp32", "ieee")]:
    ptrs = dict(r_ptr=cdt, dc_ptr=cdt, j_ptr="*i32", jval_ptr="*fp32")
    consts = dict(D_PAD=d_pad, BLOCK_M=_GEMM_LAUNCH["corr_m"], BLOCK_N=_GEMM_LAUNCH["corr_n"],
                  PREC=prec, UPCAST_DOT=False)
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in _omp_corr_kernel.arg_names}
    src = ASTSource(fn=_omp_corr_kernel, signature=sig, constexprs=consts)
    opts = {"num_warps": _GEMM_LAUNCH["corr_warps"]}
    assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm
for s, s_pad, d_pad, cdt, has_tol in [(8, 8, 128, "*bf16", False), (5, 8, 64, "*fp32", True)]:
    ptrs = dict(x_ptr="*fp32", dt_ptr="*fp32", r_ptr=cdt, rn_ptr="*fp32", j_ptr="*i32",
                jval_ptr="*fp32", b_ptr="*fp32", z_ptr="*fp32", done_ptr="*i32", idx_ptr="*i64",
                coef_ptr="*fp32", err_ptr="*fp32")
    consts = dict(S=s, S_PAD=s_pad, D_PAD=d_pad, BLOCK_M=_GEMM_LAUNCH["step_m"],
                  HAS_TOL=has_tol, DEP_TOL=DEP_EPS, CORR_FLOOR=_CORR_FLOOR["bfloat16"])
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n == "tol" else "i32")
           for n in _omp_step_kernel.arg_names}
    src = ASTSource(fn=_omp_step_kernel, signature=sig, constexprs=consts)
    opts = {"num_warps": _GEMM_LAUNCH["step_warps"]}
    assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm
print("OK")
"""


@pytest.mark.skipif(not K.HAS_TRITON, reason="no triton")
def test_kernel_compiles_for_sm90(compile_for_sm90):
    """The interpreter executes the kernel as Python and skips Triton's compiler checks
    (types of loop-carried values, shapes, constexpr use); compile for sm_90 without a GPU."""
    compile_for_sm90(_COMPILE_SM90, TRITON_DEFAULT_FP_FUSION="1")
