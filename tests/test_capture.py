"""KV capture: equals what a plain DynamicCache holds; reservoir bound; resume; calibrate folder."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kvsurgery.calibrate import calibrate
from kvsurgery.capture import capture_kv, load_layer
from kvsurgery.errors import KVSurgeryError
from kvsurgery.models import load_model
from kvsurgery.recipes import CalibrationConfig
from kvsurgery.reservoir import Reservoir, step_generator


def _dense_cache(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache


def _by_head_pos(L, n_heads, seq):
    order = torch.argsort(L["heads"].long() * 10**6 + L["positions"].long())
    return L["keys"][order].view(n_heads, seq, -1), L["values"][order].view(n_heads, seq, -1)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gemma2", "qwen2"])
@pytest.mark.parametrize("queries", [True, False])
def test_capture_equals_dynamic_cache(tiny_dirs, tmp_path, arch, queries):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs(arch)).eval()
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = _dense_cache(model, ids)
    capture_kv(
        model, ids, tmp_path, max_vectors=10_000, seed=0, capture_queries=queries, progress=False
    )
    n_kv = model.config.num_key_value_heads
    sliding_seen = False
    for i, layer in enumerate(cache.layers):
        L = load_layer(tmp_path, i)
        k, v = _by_head_pos(L, n_kv, 40)
        held_k, held_v = layer.keys[0], layer.values[0]
        n = held_k.shape[1]  # sliding-window layers keep only their window
        sliding_seen |= n < 40
        torch.testing.assert_close(k[:, -n:], held_k, rtol=0, atol=1e-6)
        torch.testing.assert_close(v[:, -n:], held_v, rtol=0, atol=1e-6)
        if queries:
            assert L["queries"].shape == (40 * model.config.num_attention_heads, k.shape[-1])
    if arch.startswith("gemma"):
        assert sliding_seen, "the sliding-window layers should have been exercised"


def test_capture_on_smollm2_short_sample(smollm2, tmp_path):
    model, tok, _ = smollm2
    ids = tok("Sliding windows and sinks keep attention exact.", return_tensors="pt")["input_ids"]
    cache = _dense_cache(model, ids)
    capture_kv(
        model, ids, tmp_path, max_vectors=10_000, seed=0, capture_queries=False, progress=False
    )
    t = ids.shape[1]
    for i in (0, 14, 29):
        k, v = _by_head_pos(load_layer(tmp_path, i), 3, t)
        torch.testing.assert_close(k, cache.layers[i].keys[0], rtol=0, atol=0)
        torch.testing.assert_close(v, cache.layers[i].values[0], rtol=0, atol=0)


def test_reservoir_is_bounded_uniform_and_order_free():
    r = Reservoir(100)
    for step in range(20):
        r.add({"x": torch.arange(step * 50, step * 50 + 50)}, step_generator(0, step))
    assert len(r) == 100 and r.seen == 1000
    assert len(set(r.fields["x"].tolist())) == 100
    # every step contributes about its share (5 each); a biased sampler would not
    counts = torch.bincount(r.fields["x"] // 50, minlength=20)
    assert counts.max() <= 15
    state = r.state("p_")
    r2 = Reservoir.from_state(100, state, "p_")
    assert torch.equal(r2.fields["x"], r.fields["x"]) and r2.seen == 1000


def test_reservoir_bound_respected_in_capture(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(3, 300, (4, 64), generator=torch.Generator().manual_seed(0))
    capture_kv(model, ids, tmp_path, max_vectors=100, seed=0, progress=False)
    for i in range(2):
        L = load_layer(tmp_path, i)
        assert L["keys"].shape[0] == 100 and L["queries"].shape[0] == 100
        assert int(L["seen"][0]) == 4 * 64 * 2


def test_resume_after_interruption_equals_uninterrupted(tiny_llama_dir, tmp_path):
    loaded = load_model(tiny_llama_dir)
    settings = CalibrationConfig(samples=5, seq_len=32, max_vectors=64, seed=3)
    a, b = tmp_path / "a", tmp_path / "b"
    calibrate(None, a, settings=settings, loaded=loaded, progress=False)
    part = calibrate(None, b, settings=settings, loaded=loaded, stop_after=2, progress=False)
    assert part["capture"]["samples_done"] == 2 and not part["capture"]["complete"]
    assert not (b / "report.json").exists()
    calibrate(None, b, settings=settings, loaded=loaded, progress=False)
    for i in range(2):
        la, lb = load_layer(a, i), load_layer(b, i)
        for key in la:
            assert torch.equal(la[key], lb[key]), key
    assert json.loads((a / "report.json").read_text()) == json.loads(
        (b / "report.json").read_text()
    )


def test_resume_refuses_other_settings(tiny_llama_dir, tmp_path):
    loaded = load_model(tiny_llama_dir)
    calibrate(
        None,
        tmp_path,
        settings=CalibrationConfig(samples=2, seq_len=16, max_vectors=64),
        loaded=loaded,
        stop_after=1,
        progress=False,
    )
    with pytest.raises(KVSurgeryError, match="holds a capture of another model, data, settings"):
        calibrate(
            None,
            tmp_path,
            settings=CalibrationConfig(samples=2, seq_len=16, max_vectors=64, seed=9),
            loaded=loaded,
            progress=False,
        )


def test_calibration_folder_manifest_and_report(tiny_llama_dir, tmp_path):
    loaded = load_model(tiny_llama_dir)
    man = calibrate(
        None,
        tmp_path,
        settings=CalibrationConfig(samples=2, seq_len=64, max_vectors=256),
        loaded=loaded,
        progress=False,
    )
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved == json.loads(json.dumps(man))
    assert saved["format_version"] == 1 and saved["capture"]["complete"]
    assert saved["model"]["revision"].startswith("sha256:")
    assert saved["data"]["name"] == "builtin:python-docs" and saved["data"]["tokens_digest"]
    assert saved["versions"]["torch"] and saved["versions"]["transformers"].startswith("5.")
    rep = json.loads((tmp_path / "report.json").read_text())
    assert len(rep["layers"]) == 2
    for layer in rep["layers"]:
        assert layer["key_norm"]["mean"] > 0 and set(layer["key_cluster_cosine"]) == {"16", "64"}
        assert all(0 < c <= 1 for c in layer["key_cluster_cosine"].values())
    table = (tmp_path / "report.md").read_text()
    assert "k-means cos@16" in table and table.count("\n| ") >= 3
    # same seed -> same report numbers
    man2 = calibrate(
        None,
        tmp_path / "again",
        settings=CalibrationConfig(samples=2, seq_len=64, max_vectors=256),
        loaded=loaded,
        progress=False,
    )
    assert man2["data"] == man["data"]
    assert json.loads((tmp_path / "again" / "report.json").read_text()) == rep


def test_capture_with_device_map_auto(tiny_llama_dir, tmp_path):
    model, _, _ = load_model(tiny_llama_dir, device_map="auto")  # one CPU here: plain placement
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(4))
    cache = _dense_cache(model, ids)
    capture_kv(model, ids, tmp_path, max_vectors=1000, seed=0, progress=False)
    k, _ = _by_head_pos(load_layer(tmp_path, 1), 2, 24)
    torch.testing.assert_close(k, cache.layers[1].keys[0].cpu(), rtol=0, atol=1e-6)
