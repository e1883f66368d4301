"""KV-Dict allocation by attention-output error (recipe ``allocation: attention``)."""

import json

import pytest
import torch
from kvsurgery.kernels.omp import omp_ref, reconstruct
from safetensors.torch import load_file

from kvsurgery.calibrate import calibrate
from kvsurgery.errors import KVSurgeryError
from kvsurgery.kvdict_calibrate import _prefix_codes, attention_error_curves, protect_cost
from kvsurgery.models import load_model
from kvsurgery.recipes import CalibrationConfig, recipe_from_dict


def test_prefix_codes_equal_omp_at_every_s():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 12, generator=gen)
    D = torch.nn.functional.normalize(torch.randn(12, 29, generator=gen), dim=0)
    for s, idx, coef in _prefix_codes(x, D, 6):
        want = reconstruct(*omp_ref(x, D, s), D)
        assert idx.shape == (37, s)
        torch.testing.assert_close(reconstruct(idx, coef, D), want, atol=1e-4, rtol=1e-4)


def _capture(windows=2, length=48, d=8, n_heads=4, n_kv=2, seed=0):
    """A capture-shaped dict: every position of every window, every head."""
    gen = torch.Generator().manual_seed(seed)
    w, p, h = torch.meshgrid(
        torch.arange(windows), torch.arange(length), torch.arange(n_kv), indexing="ij"
    )
    qw, qp, qh = torch.meshgrid(
        torch.arange(windows), torch.arange(length), torch.arange(n_heads), indexing="ij"
    )
    n, m = w.numel(), qw.numel()
    return {
        "keys": 3 * torch.randn(n, d, generator=gen),
        "values": torch.randn(n, d, generator=gen),
        "heads": h.reshape(-1).to(torch.int16),
        "positions": p.reshape(-1).to(torch.int32),
        "samples": w.reshape(-1).to(torch.int32),
        "queries": torch.randn(m, d, generator=gen),
        "q_heads": qh.reshape(-1).to(torch.int16),
        "q_positions": qp.reshape(-1).to(torch.int32),
        "q_samples": qw.reshape(-1).to(torch.int32),
    }


def _curves(cap, kmap=None, **kw):
    d = cap["keys"].shape[1]
    gen = torch.Generator().manual_seed(1)
    D = torch.nn.functional.normalize(torch.randn(d, 3 * d, generator=gen), dim=0)
    args = {"n_heads": 4, "n_kv_heads": 2, "s_max": d, "sinks": 2, "buffer": 8}
    return attention_error_curves(cap, D, D, kmap, **{**args, "coef_dtype": "float32", **kw})


def test_attention_error_curves_fall_to_zero_at_full_rank():
    cap = _capture()
    kmap = torch.diag_embed(torch.tensor([[0.5] * 8, [2.0] * 4 + [1.0] * 4]))
    for maps in (None, kmap):
        ek, ev = _curves(cap, maps)
        assert ek.shape == ev.shape == (8,)
        # d atoms span the space: the codes are exact, through the key map too.
        assert float(ek[-1]) < 1e-8 and float(ev[-1]) < 1e-8
        assert float(ek[0]) > 100 * max(float(ek[-1]), 1e-10) and float(ev[0]) > 1e-3
        assert float(ek[0]) > float(ek[3]) and float(ev[0]) > float(ev[3])


def test_attention_error_counts_only_coded_tokens():
    cap = _capture()
    near, far = _curves(cap, buffer=8), _curves(cap, buffer=30)
    # fewer coded tokens, less error
    assert float(far[0][0]) < float(near[0][0]) and float(far[1][0]) < float(near[1][0])
    with pytest.raises(KVSurgeryError, match="no captured query past sinks"):
        _curves(cap, buffer=60)
    del cap["queries"]
    with pytest.raises(KVSurgeryError, match="allocation: reconstruction"):
        _curves(cap)


RECIPE = {
    "method": "kvdict",
    "n_atoms": 64,
    "s_k": 4,
    "s_v": 2,
    "iters": 2,
    "sinks": 2,
    "buffer": 8,
    "flush": 4,
    "target_ratio": 0.3,
    "target_context": 256,
    "s_min": 1,
    "s_max": 8,
    "allocation": "attention",
}


def test_calibrate_allocates_by_attention_error(tiny_llama_dir, tmp_path):
    loaded = load_model(tiny_llama_dir)
    settings = CalibrationConfig(samples=4, seq_len=64, max_vectors=2000)

    def run(**over):
        calibrate(
            None,
            tmp_path,
            recipes=[recipe_from_dict({**RECIPE, **over})],
            settings=settings,
            loaded=loaded,
            progress=False,
        )
        return json.loads((tmp_path / "kvdict" / "result.json").read_text())

    res = run()
    n_layers = len(res["layers"])
    att = [
        load_file(tmp_path / "kvdict" / f"attention_{i:03d}.safetensors") for i in range(n_layers)
    ]
    for i, layer in enumerate(res["layers"]):
        curve_k, curve_v = res["attention_curves_k"][str(i)], res["attention_curves_v"][str(i)]
        assert len(curve_k) == len(curve_v) == 8
        assert layer["attention_err_k"] == pytest.approx(curve_k[layer["s_k"] - 1], abs=1e-6)
        assert layer["attention_err_v"] == pytest.approx(curve_v[layer["s_v"] - 1], abs=1e-6)
        assert att[i]["k"].tolist() == pytest.approx(curve_k, abs=1e-6)
    # the budget holds: exact share (2 + 8) / 256, codes 3 bytes per atom over 2 * 2 * 16
    atoms = sum(layer["s_k"] + layer["s_v"] for layer in res["layers"])
    ratio = 10 / 256 + (1 - 10 / 256) * 3 * atoms / (n_layers * 4 * 16)
    assert ratio <= 0.3 + 1e-9
    # the allocation read the attention curves: it is what choose_sparsity makes of them
    from kvsurgery.sparsity import choose_sparsity

    ek = torch.tensor([res["attention_curves_k"][str(i)] for i in range(n_layers)])
    ev = torch.tensor([res["attention_curves_v"][str(i)] for i in range(n_layers)])
    s_k, s_v = choose_sparsity(
        ek, ev, d=16, target_ratio=0.3, s_min=1, s_max=8, exact_fraction=10 / 256
    )
    assert [layer["s_k"] for layer in res["layers"]] == s_k
    assert [layer["s_v"] for layer in res["layers"]] == s_v

    # a longer buffer reuses the dictionaries but recomputes the curves (fewer coded tokens)
    dk = load_file(tmp_path / "kvdict" / "layer_000.safetensors")["dk"]
    res2 = run(buffer=32)
    assert torch.equal(load_file(tmp_path / "kvdict" / "layer_000.safetensors")["dk"], dk)
    assert res2["attention_curves_k"]["0"][0] < res["attention_curves_k"]["0"][0]


def test_protect_cost_is_the_stored_bytes_over_fp16():
    """What a protected token costs against its fp16 bytes, per storage: int8 adds a 2-byte
    scale per vector, int4 a 2-byte step and minimum per group of (up to) 32 channels; an
    odd head dim cannot pack int4 and says what to use instead."""

    def cost(dtype, d):
        return protect_cost(
            recipe_from_dict({"method": "kvdict", "protect_dtype": dtype}).config, d
        )

    assert cost("model", 64) == 1.0
    assert cost("int8", 64) == pytest.approx(66 / 128)
    assert cost("int4", 64) == pytest.approx((32 + 2 * 2 * 2) / 128)  # 2 groups of 32
    assert cost("int4", 128) == pytest.approx(5 / 16)
    assert cost("int4", 80) == pytest.approx((40 + 5 * 2 * 2) / 160)  # 5 groups of 16
    with pytest.raises(KVSurgeryError, match="protect_dtype: .*even head_dim, got 75; use"):
        cost("int4", 75)
