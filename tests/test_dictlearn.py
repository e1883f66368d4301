"""Tests for kvsurgery.dictlearn (CPU, small synthetic problems)."""

import math

import pytest
import torch
from kvsurgery.kernels.omp import omp_ref, reconstruct

from kvsurgery.dictlearn import (
    learn_dictionary,
    learn_dictionary_adam,
    make_sparse_data,
    query_key_maps,
    relative_error,
    sparsity_curve,
)

D_, N_, S_ = 16, 32, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    x, D_true = make_sparse_data(4000, D_, N_, S_, noise=0.05, seed=0)
    # Vectors of very different norms: the objective is relative, so scale must not matter.
    x = (
        x
        * torch.logspace(-2, 2, 4000).unsqueeze(1)[
            torch.randperm(4000, generator=torch.Generator().manual_seed(1))
        ]
    )
    return x[:3000], x[3000:], D_true


@pytest.fixture(scope="module")
def learned(data):
    train, held, _ = data
    return learn_dictionary(train, N_, S_, iters=12, seed=0, holdout=held)


def _heldout_err(held, D, s=S_):
    idx, coef = omp_ref(held, D, s)
    return relative_error(held, reconstruct(idx, coef, D))


def test_relative_error_definition():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    x_hat = torch.tensor([[3.0, 0.0], [5.0, 5.0], [1.0, 0.0]])
    # Row errors 4/5 and 0; the zero row is left out.
    assert relative_error(x, x_hat) == pytest.approx(0.4)
    assert relative_error(x * 1000, x_hat * 1000) == pytest.approx(0.4)


def test_heldout_error_decreases_monotonically(learned):
    D, hist = learned
    errs = [h["heldout_rel_err"] for h in hist]
    assert [h["iter"] for h in hist] == list(range(13))
    # 3000 vectors, default batch 1024: three updates per pass, the last pass full-batch.
    assert [h["batches"] for h in hist] == [0] + [3] * 11 + [1]
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 0.75 * errs[0]
    train = [h["train_rel_err"] for h in hist]
    assert all(b < a for a, b in zip(train, train[1:], strict=False)), train
    secs = [h["seconds"] for h in hist]
    assert all(b > a for a, b in zip(secs, secs[1:], strict=False))


def test_learned_beats_random_dictionary(data, learned):
    _, held, D_true = data
    D, hist = learned
    torch.testing.assert_close(D.norm(dim=0), torch.ones(N_))
    g = torch.Generator().manual_seed(7)
    R = torch.randn(D_, N_, generator=g)
    R /= R.norm(dim=0)
    err_learned = _heldout_err(held, D)
    assert err_learned == pytest.approx(hist[-1]["heldout_rel_err"], abs=1e-6)
    assert err_learned < _heldout_err(held, R) - 0.15
    # ... and the hidden dictionary is better still (the data is that sparse).
    assert _heldout_err(held, D_true) < err_learned


def test_minibatch_passes_beat_full_batch_mod(data, learned):
    train, held, _ = data
    _, hist = learned
    _, full = learn_dictionary(train, N_, S_, iters=12, seed=0, holdout=held, batch_size=10**9)
    assert all(h["batches"] == 1 for h in full[1:])
    errs = [h["heldout_rel_err"] for h in full]
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
    # Same passes over the data, same initial dictionary: many cheap updates win clearly.
    assert full[0]["heldout_rel_err"] == hist[0]["heldout_rel_err"]
    assert hist[-1]["heldout_rel_err"] < full[-1]["heldout_rel_err"] - 0.05


def test_deterministic_for_a_seed(data):
    train, held, _ = data
    D1, h1 = learn_dictionary(train, N_, S_, iters=3, seed=5, holdout=held)
    D2, h2 = learn_dictionary(train, N_, S_, iters=3, seed=5, holdout=held)
    D3, _ = learn_dictionary(train, N_, S_, iters=3, seed=6)
    assert torch.equal(D1, D2)
    assert [h["heldout_rel_err"] for h in h1] == [h["heldout_rel_err"] for h in h2]
    assert not torch.equal(D1, D3)


def test_callback_can_stop(data):
    train, _, _ = data
    seen = []
    D, hist = learn_dictionary(
        train, N_, S_, iters=10, callback=lambda e, D: seen.append(e["iter"]) or e["iter"] >= 2
    )
    assert seen == [0, 1, 2] and len(hist) == 3
    assert D.shape == (D_, N_)


def test_too_few_vectors_is_a_clear_error():
    x = torch.randn(40, 8)
    x[:5] = 0
    with pytest.raises(
        ValueError, match=r"needs at least 64 non-zero training vectors.*got 35 \(5 zero"
    ):
        learn_dictionary(x, 64, 2)
    with pytest.raises(ValueError, match=r"s must be in \[1, min\(d=8"):
        learn_dictionary(torch.randn(100, 8), 16, 9)
    with pytest.raises(ValueError, match="needs at least 64"):
        learn_dictionary_adam(x, 64, 2)
    # More atoms than dimensions is fine as long as there are enough vectors.
    D, _ = learn_dictionary(torch.randn(70, 8), 64, 2, iters=2)
    assert D.shape == (8, 64) and torch.isfinite(D).all()


def test_unused_atoms_are_reseeded():
    # 4 distinct directions only: most of the 16 atoms (copies of them) go unused.
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 8, generator=g)
    x = base[torch.randint(0, 4, (400,), generator=g)] + 0.01 * torch.randn(400, 8, generator=g)
    x = torch.cat([x, torch.randn(40, 8, generator=g)])
    D, hist = learn_dictionary(x, 16, 1, iters=3)
    assert sum(h["reseeded"] for h in hist) > 0
    G = (D.T @ D).abs().fill_diagonal_(0)
    assert G.max() <= 0.99 + 1e-4 or hist[-1]["reseeded"] > 0


def test_adam_baseline_runs_and_learns(data):
    train, held, _ = data
    D0, h0 = learn_dictionary(train, N_, S_, iters=0, holdout=held)
    D, hist = learn_dictionary_adam(train, N_, S_, epochs=3, lr=1e-2, batch_size=256, holdout=held)
    # Same initial dictionary as the MOD learner.
    assert hist[0]["heldout_rel_err"] == pytest.approx(h0[0]["heldout_rel_err"])
    assert [h["iter"] for h in hist] == [0, 12, 24, 36]
    assert hist[-1]["heldout_rel_err"] < hist[0]["heldout_rel_err"] - 0.02
    torch.testing.assert_close(D.norm(dim=0), torch.ones(N_))
    _, short = learn_dictionary_adam(
        train, N_, S_, epochs=5, eval_every=5, callback=lambda e, D: e["iter"] >= 10
    )
    assert [h["iter"] for h in short] == [0, 5, 10]


def test_sparsity_curve(data, learned):
    _, held, _ = data
    D, _ = learned
    curve = sparsity_curve(held, D, 6)
    assert curve.shape == (6,)
    assert (curve[1:] <= curve[:-1]).all()
    for s in (1, 3, 6):
        assert curve[s - 1] == pytest.approx(_heldout_err(held, D, s), abs=1e-4)
    with pytest.raises(ValueError, match="non-zero"):
        sparsity_curve(torch.zeros(3, D_), D, 2)


def test_query_key_maps():
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(0, 1.5, 8)
    q = torch.randn(6000, 8, generator=g) * scale  # anisotropic queries
    heads = torch.arange(6000) % 6  # 6 query heads over 2 KV heads: 0-2 -> 0, 3-5 -> 1
    q[heads >= 3] *= torch.linspace(2, 0.5, 8)  # head groups see different metrics
    identity = query_key_maps(q, heads, 2, 0.0)
    torch.testing.assert_close(identity, torch.eye(8).expand(2, 8, 8))
    w = query_key_maps(q, heads, 2, 1.0)
    assert w.shape == (2, 8, 8) and not torch.allclose(w[0], w[1], rtol=0.1)
    torch.testing.assert_close(w, torch.diag_embed(torch.diagonal(w, dim1=1, dim2=2)))
    torch.testing.assert_close((w**2).sum((1, 2)) / 8, torch.ones(2))  # mean squared entry 1
    for h in range(2):  # alpha 1: W² is E[q²] averaged over each rotary pair (i, i + 4)
        m = q[heads // 3 == h].double().pow(2).mean(0)
        m = (m[:4] + m[4:]).repeat(2)
        w2 = torch.diagonal(w[h]).double() ** 2
        torch.testing.assert_close(w2 / w2.sum(), m / m.sum(), rtol=1e-4, atol=1e-6)
    # so the map commutes with RoPE: rotating a pair by any angle commutes with W
    c, s = math.cos(0.7), math.sin(0.7)
    rot = torch.eye(8)
    rot[1, 1], rot[1, 5], rot[5, 1], rot[5, 5] = c, -s, s, c
    torch.testing.assert_close(rot @ w[0], w[0] @ rot)
    half = query_key_maps(q, heads, 2, 0.5)  # alpha 0.5: the square root of the alpha-1 map
    ref = torch.diagonal(w[0]).sqrt()
    torch.testing.assert_close(
        torch.diagonal(half[0]) / torch.diagonal(half[0]).norm(), ref / ref.norm()
    )
    with pytest.raises(ValueError, match="do not group"):
        query_key_maps(q, heads, 4, 0.5)
    with pytest.raises(ValueError, match="need >= 8"):
        query_key_maps(q[:12], heads[:12], 2, 0.5)
    with pytest.raises(ValueError, match="odd"):
        query_key_maps(q[:, :7], heads, 2, 0.5)
