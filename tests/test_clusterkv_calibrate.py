"""ClusterKV beyond the kernels: recipe validation, the recall replay and the budget
allocation, calibration on a tiny model, export round trip, CPU offload."""

import itertools
import json

import pytest
import torch

from kvsurgery.calibrate import calibrate
from kvsurgery.clusterkv_recall import allocate, selection_recall
from kvsurgery.demo import run_fresh_process
from kvsurgery.errors import KVSurgeryError
from kvsurgery.export import apply_default, apply_to_model, export, inspect_checkpoint
from kvsurgery.models import load_model
from kvsurgery.recipes import CalibrationConfig, RecipeError, load_recipe, recipe_from_dict
from kvsurgery.runtime.kvs_attention import ATTN_NAME
from kvsurgery.runtime.kvs_clusterkv import ClusterKVLayer
from kvsurgery.runtime.kvs_methods import build_cache

RECIPE = dict(
    method="clusterkv",
    budget=40,
    target_context=160,
    sinks=2,
    window=8,
    tokens_per_cluster=4,
    tpc_choices=[2, 4, 8],
    append_every=16,
    append_clusters=2,
    kmeans_iters=3,
)
SETTINGS = CalibrationConfig(samples=2, seq_len=128, max_vectors=4000)
PROMPT = " ".join(["the of and to a in is that for it as he was"] * 8)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on shared cores: threads only spin
    yield
    torch.set_num_threads(n)


# -- recipes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, key",
    [
        ({"budget": 10}, "budget"),  # not above sinks + window
        ({"target_context": 40}, "target_context"),
        ({"tpc_choices": []}, "tpc_choices"),
        ({"tpc_choices": [4, 0]}, "tpc_choices"),
        ({"append_clusters": 17}, "append_clusters"),
        ({"kmeans_iters": 0}, "kmeans_iters"),
        ({"offload": "yes"}, "offload"),
        ({"estimate_rest": 1}, "estimate_rest"),
        ({"spread_ranking": "yes"}, "spread_ranking"),
        ({"n_atoms": 4}, "n_atoms"),  # a KV-Dict key
        ({"layers": {"0": {"budget": 64}}}, "layers.0.budget"),  # not a per-layer key
    ],
)
def test_recipe_errors_name_the_key(change, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        recipe_from_dict({**RECIPE, **change})


def test_shipped_recipes_load():
    for name in ("clusterkv", "clusterkv-256", "clusterkv-1024"):
        r = load_recipe(f"recipes/{name}.yaml")
        assert r.method == "clusterkv" and r.calibration["seq_len"] >= r.config.target_context
        c = r.config  # clusters appended during decoding are as fine as the prefill's
        assert c.append_every == c.append_clusters * c.tokens_per_cluster, name
        assert c.tpc_choices == [c.tokens_per_cluster], name


def test_no_queries_refused_before_model_load(tmp_path):
    with pytest.raises(KVSurgeryError, match="needs captured queries"):
        calibrate(
            "no/such-model",
            tmp_path / "cal",
            recipes=[recipe_from_dict(RECIPE)],
            settings=CalibrationConfig(capture_queries=False),
            progress=False,
        )


# -- maths --------------------------------------------------------------------------------
@pytest.mark.parametrize("spread", [False, True])
def test_selection_recall_replays_the_runtime_selection(spread):
    g = torch.Generator().manual_seed(0)
    H_kv, grp, T, d, P = 2, 3, 90, 16, 66
    k = torch.randn(H_kv, T, d, generator=g)
    q = torch.randn(H_kv * grp, T, d, generator=g)
    kw = dict(sinks=3, window=6, tokens_per_cluster=5)
    budgets = [0, 7, 25, 1000]
    got = selection_recall(
        k, q[:, P:], torch.arange(P, T), prefill=P, budgets=budgets, iters=4, seed=0,
        spread=spread, **kw,
    )  # fmt: skip
    for b, r in zip(budgets, got, strict=True):
        layer = ClusterKVLayer(
            budget=b, append_every=10**6, kmeans_iters=4, spread_ranking=spread, **kw
        )
        layer.update(k[None, :, :P], k[None, :, :P])
        mass = []
        for p in range(P, T):
            layer.update(k[None, :, p : p + 1], k[None, :, p : p + 1])
            valid = torch.ones(1, layer.seen, dtype=torch.bool)
            layer._maybe_cluster(valid)
            idx, n = layer.select_tokens(q[None, :, p : p + 1], valid)
            for h in range(H_kv * grp):
                pr = (k[h // grp, : p + 1] @ q[h, p] * d**-0.5).softmax(0)
                mass.append(float(pr[idx[0, h // grp, : n[0, h // grp]]].sum()))
        assert abs(sum(mass) / len(mass) - float(r)) < 1e-5
    assert got[0] < got[1] < got[2] < got[3] and abs(float(got[3]) - 1) < 1e-5


def test_allocate_is_the_exact_optimum():
    g = torch.Generator().manual_seed(1)
    L, K = 4, 4
    rec = torch.rand(L, K, generator=g).sort(1).values
    rec[2, 0] = float("-inf")  # not allowed
    costs = torch.tensor([3, 5, 8, 13])
    for total in (14, 20, 31, 52):
        choice, value = allocate(rec, costs, total, unit=1)
        best = max(
            (sum(float(rec[i, c[i]]) for i in range(L)), c)
            for c in itertools.product(range(K), repeat=L)
            if sum(int(costs[x]) for x in c) <= total and rec[2, c[2]] > float("-inf")
        )
        assert abs(value - best[0]) < 1e-9 and sum(int(costs[c]) for c in choice) <= total
    with pytest.raises(ValueError, match="cheapest"):
        allocate(rec, costs, 10, unit=1)


# -- calibration, export ------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibrated(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckv")
    recipe = recipe_from_dict({**RECIPE, "layers": {"1": {"tokens_per_cluster": 8}}})
    loaded = load_model(tiny_llama_dir)
    man = calibrate(
        None, tmp / "cal", recipes=[recipe], settings=SETTINGS, loaded=loaded, progress=False
    )
    return man, tmp


def test_calibration_writes_per_layer_choices_and_recall(calibrated):
    man, tmp = calibrated
    entry = man["methods"]["clusterkv"]
    assert man["settings"]["capture_queries"]
    result = json.loads((tmp / "cal" / "clusterkv" / "result.json").read_text())
    layers = entry["layers"]
    assert len(layers) == 2 == len(result["layers"])
    for p in layers:
        assert not p.get("dense")
        assert p["budget"] >= RECIPE["append_every"] and p["tokens_per_cluster"] in (2, 4, 8)
        assert 0 < p["uniform_recall"] <= p["recall"] <= 1 + 1e-6 and p["windows"] == 2
    assert layers[1]["tokens_per_cluster"] == 8  # pinned by the per-layer override
    assert list(result["curves"]["1"]) == ["8"] and len(result["curves"]["0"]) == 3
    assert entry["mean_tokens_per_step"] <= RECIPE["budget"]
    report = (tmp / "cal" / "report.md").read_text()
    assert "ckv recall" in report and "ckv tpc" in report


def test_more_budget_more_recall_and_dense_layers(calibrated, tiny_llama_dir):
    from kvsurgery.calibrate import read_manifest
    from kvsurgery.clusterkv_calibrate import calibrate_clusterkv

    _, tmp = calibrated
    dims = read_manifest(tmp / "cal")["dims"]
    small = calibrate_clusterkv(tmp / "cal", recipe_from_dict(RECIPE), dims, progress=False)
    big = calibrate_clusterkv(
        tmp / "cal", recipe_from_dict({**RECIPE, "budget": 100}), dims, progress=False
    )
    assert big["manifest"]["mean_recall"] > small["manifest"]["mean_recall"]
    forced = calibrate_clusterkv(
        tmp / "cal",
        recipe_from_dict({**RECIPE, "budget": 100, "layers": {"0": {"dense": True}}}),
        dims,
        progress=False,
    )
    assert forced["manifest"]["layers"][0] == {"dense": True, "recall": 1.0}
    assert forced["manifest"]["dense_layers"] == [0]
    with pytest.raises(KVSurgeryError, match="raise budget"):  # dense layer + minimum > total
        calibrate_clusterkv(
            tmp / "cal",
            recipe_from_dict({**RECIPE, "layers": {"0": {"dense": True}}}),
            dims,
            progress=False,
        )


def _generate(model, tok, cache=None, n=12):
    ids = tok(PROMPT, return_tensors="pt")
    kw = {"past_key_values": cache} if cache is not None else {}
    out = model.generate(
        **ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, **kw
    )
    return out[0, ids["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("estimate_rest, spread", [(False, False), (True, False), (False, True)])
def test_budget_covering_the_context_equals_dense(tiny_llama_dir, estimate_rest, spread):
    model, tok, _ = load_model(tiny_llama_dir)
    dense = _generate(model, tok)
    flags = {"estimate_rest": estimate_rest, "spread_ranking": spread}
    recipe = recipe_from_dict({**RECIPE, "budget": 150, "tokens_per_cluster": 3, **flags})
    apply_default(model, "clusterkv", recipe)
    model.set_attn_implementation(ATTN_NAME)
    cache = build_cache(model)
    assert _generate(model, tok, cache) == dense
    assert all(layer.segments and layer.n_clusters for layer in cache.layers)  # clusters read
    # the recipe flag reaches the layers through the config block
    assert all(layer.estimate_rest == estimate_rest for layer in cache.layers)
    assert all(layer.vmeans.shape[-1] == (16 if estimate_rest else 0) for layer in cache.layers)
    assert all(layer.spread_ranking == spread for layer in cache.layers)
    assert all(layer.kvars.shape[-1] == (16 if spread else 0) for layer in cache.layers)


def test_export_round_trip_in_a_fresh_process(calibrated, tiny_llama_dir):
    _, tmp = calibrated
    out = export(tmp / "cal", tmp / "exp", method="clusterkv", loaded=load_model(tiny_llama_dir))
    block = json.loads((out / "config.json").read_text())["kvsurgery"]
    assert block["method"] == "clusterkv" and block["offload"] is False
    assert block["estimate_rest"] is False and block["spread_ranking"] is False
    assert [set(p) for p in block["layers"]] == [{"budget", "tokens_per_cluster"}] * 2
    assert "ClusterKV" in (out / "README.md").read_text()
    report = inspect_checkpoint(out)
    assert report["loads_compressed"] and not report["problems"], report
    res = run_fresh_process(out, PROMPT, 12)  # kvsurgery blocked in the child
    assert res["compressed"]["cache_type"] == "KVSurgeryCache"
    model, tok, _ = load_model(tiny_llama_dir)
    apply_to_model(model, tmp / "cal", "clusterkv")
    model.set_attn_implementation(ATTN_NAME)
    cache = build_cache(model)
    assert res["compressed"]["tokens"] == _generate(model, tok, cache)
    layer = cache.layers[0]
    assert layer.segments and layer.budget == block["layers"][0]["budget"]


# -- offload ------------------------------------------------------------------------------
@pytest.mark.parametrize("estimate_rest", [False, True])
def test_offload_equals_resident_and_keeps_only_the_working_set(estimate_rest):
    # estimate_rest: cluster mean values summed on the host; both: key variances (ranking)
    g = torch.Generator().manual_seed(5)
    B, H, H_kv, d, T = 2, 6, 2, 16, 90
    kw = dict(
        budget=14,
        sinks=3,
        window=6,
        tokens_per_cluster=5,
        append_every=8,
        append_clusters=2,
        kmeans_iters=3,
        estimate_rest=estimate_rest,
        spread_ranking=estimate_rest,
    )
    plain, off = ClusterKVLayer(**kw), ClusterKVLayer(offload=True, **kw)
    k, v = torch.randn(B, H_kv, T, d, generator=g), torch.randn(B, H_kv, T, d, generator=g)
    mask = torch.ones(B, T + 40, dtype=torch.bool)
    mask[1, :13] = False  # left padding in row 1
    for layer in (plain, off):
        layer.update(k, v)
    assert off.device_tensors() == (
        "centroids",
        "vmeans",
        "kvars",
        "sizes",
        "offsets",
        "sorted_ids",
        "_res_k",
        "_res_v",
        "_res_pos",
    )
    steps = [1] * 12 + [5] + [1] * 6  # single tokens, a multi-token step, crop, more
    for i, n in enumerate(steps):
        kn, vn = torch.randn(B, H_kv, n, d, generator=g), torch.randn(B, H_kv, n, d, generator=g)
        q = torch.randn(B, H, n, d, generator=g)
        outs = []
        for layer in (plain, off):
            layer.update(kn, vn)
            am = mask[:, None, None, : layer.seen].expand(B, 1, n, layer.seen)
            if n > 1:
                am = am & torch.ones(n, layer.seen, dtype=torch.bool).tril(layer.seen - n)
            outs.append(layer.attend(q, am, d**-0.5))
        assert torch.equal(outs[0], outs[1])
        # resident: at most sinks + window + budget + current per kv head (+ padding slots)
        assert off._res_k.shape[2] <= 3 + 6 + 14 + n + 1
        if i == 13:
            before = off.h2d_bytes
            for layer in (plain, off):
                layer.crop(-3)
    assert len(off.segments) >= 3 and off.h2d_bytes > before
    assert off.vmeans.shape[2:] == ((off.n_clusters, d) if estimate_rest else (off.n_clusters, 0))
    assert off.kvars.shape[2:] == off.vmeans.shape[2:]
    assert off.nbytes() < plain.nbytes() and off.host_nbytes() > 0 == plain.host_nbytes()
    # the same query again: its working set is resident, nothing is copied
    q = torch.randn(B, H, 1, d, generator=g)
    valid = mask[:, : off.seen]
    idx, n_valid = off.select_tokens(q, valid)
    off._recall(idx, n_valid)
    before = off.h2d_bytes
    off._recall(idx, n_valid)
    assert off.h2d_bytes == before
