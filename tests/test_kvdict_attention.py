"""KV-Dict decode attention: torch reference vs dense fp32, Triton kernel vs reference.

The Triton kernels run under Triton's CPU interpreter. ``triton.jit`` binds to the
interpreter when triton is first imported, so TRITON_INTERPRET must be set before that;
if another test module imported triton first, the kernel tests re-run this file in a
subprocess instead (see ``test_triton_suite_in_subprocess``).
"""

import os

import torch  # importing torch does not import triton

# Compiled kernels where a GPU is; elsewhere Triton's interpreter, which must be chosen
# before the first `import triton` of the process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
from kvsurgery.kernels import kvdict_attention as kva  # noqa: E402

CAN_RUN_TRITON = kva._HAS_TRITON and (kva.triton_interpreter_active() or torch.cuda.is_available())
DEV = "cuda" if (torch.cuda.is_available() and not kva.triton_interpreter_active()) else "cpu"
needs_triton = pytest.mark.skipif(
    not CAN_RUN_TRITON,
    reason="triton imported before TRITON_INTERPRET=1; covered by the subprocess test",
)


def make_case(
    B,
    H,
    H_kv,
    d,
    N_k,
    N_v,
    T,
    E,
    s_k,
    s_v,
    Q=1,
    dtype=torch.float32,
    coef_dtype=torch.float8_e4m3fn,
    pad=True,
    seed=0,
    device=DEV,
):
    """Random dictionaries/codes/exact tokens; batch row b > 0 has leading padded tokens."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen)

    Dk = torch.nn.functional.normalize(rn(d, N_k), dim=0)
    Dv = torch.nn.functional.normalize(rn(d, N_v), dim=0)
    k_idx = torch.randint(0, N_k, (B, H_kv, T, s_k), generator=gen).to(torch.int16)
    v_idx = torch.randint(0, N_v, (B, H_kv, T, s_v), generator=gen).to(torch.int16)
    k_coef = (2.0 * rn(B, H_kv, T, s_k)).to(coef_dtype)
    v_coef = rn(B, H_kv, T, s_v).to(coef_dtype)
    k_exact = (2.0 * rn(B, H_kv, E, d)).to(dtype)
    v_exact = rn(B, H_kv, E, d).to(dtype)
    q = (2.0 * rn(B, H, Q, d)).to(dtype)
    comp_mask = exact_mask = None
    if pad:
        comp_mask = torch.ones(B, Q, T, dtype=torch.bool)
        for b in range(1, B):
            comp_mask[b, :, : min(T, 7 * b + 3)] = False
        if Q > 1 and E >= Q:  # causality among the Q new tokens (the last Q exact ones)
            e = torch.arange(E)
            exact_mask = (e[None, :] <= E - Q + torch.arange(Q)[:, None]).expand(B, Q, E)
            exact_mask = exact_mask.clone()
    c = dict(
        q=q,
        Dk=Dk,
        Dv=Dv,
        k_idx=k_idx,
        k_coef=k_coef,
        v_idx=v_idx,
        v_coef=v_coef,
        k_exact=k_exact,
        v_exact=v_exact,
        scale=d**-0.5,
        comp_mask=comp_mask,
        exact_mask=exact_mask,
    )
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in c.items()}


def dense_truth(c):
    """fp32 attention over K/V reconstructed from the codes as stored (fp8 coefficients)."""
    B, Q = c["q"].shape[0], c["q"].shape[2]
    T, E = c["k_idx"].shape[2], c["k_exact"].shape[2]
    K = torch.cat(
        [kva.kvdict_reconstruct(c["Dk"], c["k_idx"], c["k_coef"]), c["k_exact"].float()], 2
    )
    V = torch.cat(
        [kva.kvdict_reconstruct(c["Dv"], c["v_idx"], c["v_coef"]), c["v_exact"].float()], 2
    )
    dev = c["q"].device
    cm = c["comp_mask"]
    em = c["exact_mask"]
    cm = torch.ones(B, Q, T, dtype=torch.bool, device=dev) if cm is None else cm.expand(B, Q, T)
    em = torch.ones(B, Q, E, dtype=torch.bool, device=dev) if em is None else em.expand(B, Q, E)
    mask = torch.cat([cm, em], -1)
    return kva.dense_attention_fp32(c["q"], K, V, c["scale"], mask), K, V, mask


def decode_masks(c):
    """Q == 1 masks in the kernel's (B, X) form."""
    cm, em = c["comp_mask"], c["exact_mask"]
    return (None if cm is None else cm[:, 0]), (None if em is None else em[:, 0])


def run_triton(c, **kw):
    cm, em = decode_masks(c)
    args = [c[k] for k in ("q", "Dk", "Dv", "k_idx", "k_coef", "v_idx", "v_coef")]
    return kva.kvdict_decode_triton(*args, c["k_exact"], c["v_exact"], c["scale"], cm, em, **kw)


def run_ref(c, **kw):
    return kva.kvdict_attention_ref(**c, **kw)


# ---------------------------------------------------------------------------------------
# reference vs dense fp32
# ---------------------------------------------------------------------------------------

REF_CASES = [
    # B, H, H_kv, d, N_k, N_v, T, E, s_k, s_v, Q
    (1, 9, 3, 16, 37, 300, 27, 0, 4, 3, 1),
    (3, 4, 4, 64, 300, 37, 61, 5, 8, 5, 1),
    (3, 8, 2, 64, 37, 300, 113, 130, 3, 6, 1),
    (2, 8, 2, 16, 37, 300, 61, 9, 4, 6, 4),
    (3, 9, 3, 16, 300, 37, 0, 5, 4, 3, 3),
    (2, 9, 3, 16, 37, 300, 61, 5, 1, 1, 1),  # one atom each (recipes allow s_min 1)
]


@pytest.mark.parametrize("shape", REF_CASES)
def test_reference_matches_dense(shape):
    B, H, H_kv, d, N_k, N_v, T, E, s_k, s_v, Q = shape
    c = make_case(B, H, H_kv, d, N_k, N_v, T, E, s_k, s_v, Q=Q, device="cpu")
    truth = dense_truth(c)[0]
    out = run_ref(c)
    assert out.shape == (B, H, Q, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, truth, atol=2e-6, rtol=1e-5)


def test_reference_chunked_matches_unchunked(monkeypatch):
    c = make_case(2, 8, 2, 16, 37, 300, 113, 5, 4, 6, Q=2, device="cpu")
    full = run_ref(c)
    monkeypatch.setattr(kva, "_REF_CHUNK_ELEMS", 500)  # forces many T chunks
    torch.testing.assert_close(run_ref(c), full, atol=1e-6, rtol=1e-6)


def test_reference_fp16_coefficients_and_upcast_false():
    c = make_case(2, 8, 2, 16, 37, 300, 40, 6, 4, 3, coef_dtype=torch.float16, device="cpu")
    truth = dense_truth(c)[0]
    torch.testing.assert_close(run_ref(c), truth, atol=2e-6, rtol=1e-5)
    c16 = dict(c, q=c["q"].half(), k_exact=c["k_exact"].half(), v_exact=c["v_exact"].half())
    out = run_ref(c16, upcast=False)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), dense_truth(c16)[0], atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------------------
# Triton kernel vs reference (interpreter on CPU)
# ---------------------------------------------------------------------------------------

TRITON_CASES = [
    # B, H, H_kv, d, N_k, N_v, T, E, s_k, s_v
    (1, 9, 3, 16, 37, 300, 27, 0, 4, 3),
    (3, 4, 4, 64, 300, 37, 61, 5, 8, 5),
    (3, 8, 2, 64, 37, 300, 113, 130, 3, 6),
    (3, 9, 3, 16, 300, 37, 113, 5, 6, 8),
    (1, 8, 2, 16, 37, 300, 61, 130, 5, 4),
    (3, 8, 2, 16, 37, 300, 0, 5, 4, 3),  # T = 0: exact tokens only
    (2, 9, 3, 16, 37, 300, 61, 5, 1, 1),  # one atom each
]
SPLITS = [dict(), dict(block_t=16, split_len=32)]  # heuristic / many splits, ragged tiles


@needs_triton
@pytest.mark.parametrize("split", SPLITS, ids=["auto", "split32"])
@pytest.mark.parametrize("shape", TRITON_CASES)
def test_triton_matches_reference(shape, split):
    c = make_case(*shape)
    ref = run_ref(c)
    out = run_triton(c, **split)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@needs_triton
def test_triton_duplicate_atoms_accumulate():
    # 3 value atoms for 113 * 6 (token, slot) pairs: every tile scatters to repeated atoms
    c = make_case(2, 8, 2, 16, 5, 3, 113, 4, 4, 6)
    torch.testing.assert_close(run_triton(c, block_t=32), run_ref(c), atol=2e-6, rtol=1e-5)


@needs_triton
def test_triton_fp16_coefficients():
    c = make_case(2, 8, 2, 16, 37, 300, 61, 5, 4, 3, coef_dtype=torch.float16)
    torch.testing.assert_close(run_triton(c), run_ref(c), atol=2e-6, rtol=1e-5)


@needs_triton
def test_triton_strided_cache_views_and_3d_masks():
    """Codes/exact tokens as views into preallocated (T_max, E_max) buffers."""
    B, H, H_kv, d, T, E, T_max, E_max = 2, 8, 2, 16, 45, 7, 80, 16
    c = make_case(B, H, H_kv, d, 37, 300, T, E, 4, 3)
    big = {}
    for name, length in [("k_idx", T_max), ("k_coef", T_max), ("v_idx", T_max), ("v_coef", T_max)]:
        x = c[name]
        buf = torch.zeros(B, H_kv, length, x.shape[-1], dtype=x.dtype, device=x.device)
        buf[:, :, :T] = x
        big[name] = buf[:, :, :T]
    for name in ("k_exact", "v_exact"):
        buf = torch.zeros(B, H_kv, E_max, d, dtype=c[name].dtype, device=DEV)
        buf[:, :, :E] = c[name]
        big[name] = buf[:, :, :E]
    assert not big["k_idx"].is_contiguous() and not big["k_exact"].is_contiguous()
    cv = dict(c, **big)
    cm = c["comp_mask"]  # (B, 1, T): the 3-D decode form is accepted too
    args = [cv[k] for k in ("q", "Dk", "Dv", "k_idx", "k_coef", "v_idx", "v_coef")]
    out = kva.kvdict_decode_triton(*args, cv["k_exact"], cv["v_exact"], cv["scale"], cm, None)
    torch.testing.assert_close(out, run_ref(c), atol=2e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("which", ["comp", "exact", "both", "both_no_exact", "one_row"])
def test_triton_fully_masked_parts(which):
    E = 0 if which == "both_no_exact" else 6
    c = make_case(3, 8, 2, 16, 37, 300, 40, E, 4, 3)
    B, T = 3, 40
    cm = torch.ones(B, 1, T, dtype=torch.bool, device=DEV)
    em = torch.ones(B, 1, E, dtype=torch.bool, device=DEV)
    if which in ("comp", "both", "both_no_exact"):
        cm[:] = False
    if which in ("exact", "both"):
        em[:] = False
    if which == "one_row":  # one batch row sees nothing, the others everything
        cm[1] = False
        em[1] = False
    c = dict(c, comp_mask=cm, exact_mask=em)
    ref = run_ref(c)
    out = run_triton(c, block_t=16, split_len=16)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ref, dense_truth(c)[0], atol=2e-6, rtol=1e-5)
    if which in ("both", "both_no_exact"):
        assert (out == 0).all()
    if which == "one_row":
        assert (out[1] == 0).all() and (out[0].abs() > 0).any()
    if which == "comp":  # exact-only attention
        cx = make_case(3, 8, 2, 16, 37, 300, 0, E, 4, 3, pad=False)
        cx = dict(cx, q=c["q"], k_exact=c["k_exact"], v_exact=c["v_exact"])
        torch.testing.assert_close(out, run_triton(cx), atol=2e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_dtypes_vs_torch_low_precision(dtype):
    """Kernel error <= 2 x PyTorch's own error in that dtype (dense SDPA) + atol."""
    c = make_case(3, 8, 2, 64, 37, 300, 61, 9, 4, 3, dtype=dtype)
    truth, K, V, mask = dense_truth(c)
    out = run_triton(c)
    ref = run_ref(c)
    assert out.dtype == dtype and ref.dtype == dtype
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        c["q"], K.to(dtype), V.to(dtype), attn_mask=mask[:, None], scale=c["scale"], enable_gqa=True
    )
    torch_err = (sdpa.float() - truth).abs().max().item()
    atol = 1e-5
    for got in (out, ref):
        err = (got.float() - truth).abs().max().item()
        assert err <= 2 * torch_err + atol, (dtype, err, torch_err)


# ---------------------------------------------------------------------------------------
# dispatcher, import without triton, interpreter fallback
# ---------------------------------------------------------------------------------------


def test_dispatcher_cpu_multi_query_uses_reference():
    c = make_case(2, 8, 2, 16, 37, 300, 30, 6, 4, 3, Q=3, device="cpu")
    torch.testing.assert_close(kva.kvdict_attention(**c), run_ref(c), atol=0, rtol=0)


def test_module_imports_and_runs_without_triton():
    path = kva.__file__
    code = textwrap.dedent(
        f"""
        import importlib.util, sys, torch
        sys.modules["triton"] = None  # import triton -> ImportError
        spec = importlib.util.spec_from_file_location("kvdict_attention", {path!r})
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        assert not m._HAS_TRITON
        q = torch.randn(1, 4, 1, 8)
        Dk, Dv = torch.randn(8, 5), torch.randn(8, 6)
        ki = torch.randint(0, 5, (1, 2, 3, 2), dtype=torch.int16)
        vi = torch.randint(0, 6, (1, 2, 3, 2), dtype=torch.int16)
        kc = torch.randn(1, 2, 3, 2).to(torch.float8_e4m3fn)
        vc = torch.randn(1, 2, 3, 2).to(torch.float8_e4m3fn)
        ex = torch.randn(1, 2, 2, 8)
        out = m.kvdict_attention(q, Dk, Dv, ki, kc, vi, vc, ex, ex, 0.35)
        assert out.shape == (1, 4, 1, 8) and torch.isfinite(out).all()
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(CAN_RUN_TRITON or not kva._HAS_TRITON, reason="kernel tests ran in-process")
def test_triton_suite_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "triton",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


_SM90_COMPILE = r"""
import re
from kvsurgery.kernels import kvdict_attention as kva

for G, G_P, S, D, fp8, masks in [(4, 4, 8, 128, True, True), (3, 4, 6, 64, False, False)]:
    cty = "*u8" if fp8 else "*fp16"
    S_P = 1 << (S - 1).bit_length()
    build(kva._kvdict_scores_kernel,
          dict(u_ptr="*fp32", kidx_ptr="*i16", kcoef_ptr=cty, cmask_ptr="*u8", qf_ptr="*fp32",
               kex_ptr="*bf16", vex_ptr="*bf16", emask_ptr="*u8", scores_ptr="*fp32",
               m_ptr="*fp32", l_ptr="*fp32", oe_ptr="*fp32", slab_ptr="*fp32"),
          dict(S_K=S, S_K_P=S_P, G_P=G_P, D=D, D_P=D, BLOCK_T=64, BLOCK_E=8, BLOCK_N=256,
               COEF_FP8=fp8, HAS_CMASK=masks, HAS_EMASK=masks), floats=("scale_log2e",))
    k = build(kva._kvdict_values_kernel,
              dict(scores_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", vidx_ptr="*i16",
                   vcoef_ptr=cty, slab_ptr="*fp32"),
              dict(S_V=S, S_V_P=S_P, G_P=G_P, BLOCK_T=64, COEF_FP8=fp8))
    atoms = set(re.findall(r"\b(?:red|atom)\.global[\w.]*", k.asm["ptx"]))
    assert atoms and all(".relaxed" in a for a in atoms), atoms
    build(kva._kvdict_merge_kernel,
          dict(m_ptr="*fp32", l_ptr="*fp32", slab_ptr="*fp32", oe_ptr="*fp32", w_ptr="*fp32",
               out_e_ptr="*fp32"),
          dict(G=G, G_P=G_P, NS_P=32, D=D, D_P=D, BLOCK_N=256))
print("OK")
"""


@pytest.mark.skipif(not kva._HAS_TRITON, reason="no triton")
def test_kernels_compile_for_sm90(compile_for_sm90):
    """The interpreter runs kernels as Python and skips Triton's type checks; compile them
    for sm_90 (no GPU needed) so frontend/codegen errors show up here, not on the H100."""
    compile_for_sm90(_SM90_COMPILE, TRITON_DEFAULT_FP_FUSION="1")


@needs_triton
def test_triton_many_exact_splits():
    c = make_case(3, 8, 2, 16, 37, 300, 20, 75, 4, 3)
    em = torch.rand(3, 75, generator=torch.Generator().manual_seed(1)) > 0.3
    c = dict(c, exact_mask=em[:, None].to(DEV))
    torch.testing.assert_close(run_triton(c, esplit_len=8), run_ref(c), atol=2e-6, rtol=1e-5)
