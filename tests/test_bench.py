"""`kvsurgery bench` on tiny shapes (CPU): every method timed against dense, memory read from
the state's storage, the JSON complete, the table last, bad options refused with exit 2."""

import json
import time

import pytest
from click.testing import CliRunner

from kvsurgery import bench_methods as bm
from kvsurgery.bench import BenchConfig, results_table
from kvsurgery.cli import main

H, HKV, D = 4, 2, 32
TINY = [
    "--heads", str(H), "--kv-heads", str(HKV), "--head-dim", str(D), "--dtype", "float32",
    "--n-atoms", "64", "--s-k", "4", "--s-v", "3", "--kvdict-sinks", "4", "--kvdict-buffer", "32",
    "--budget", "64", "--cluster-sinks", "4", "--window", "32", "--tokens-per-cluster", "16",
    "--kmeans-iters", "3", "--subgen-window", "32", "--subgen-s", "16",
    "--subgen-cluster-tokens", "16", "--repeats", "3", "--warmup", "1", "--threads", "1",
]  # fmt: skip
CONTEXTS, BATCHES = (256, 512), (1, 2)
# SubGen is measured when its kernels are installed (guarded in the method table)
ALL = ("dense", *bm.available_methods())


def _run(args):
    return CliRunner().invoke(main, ["bench", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    res = _run([*TINY, "--contexts", "256,512", "--batch", "1,2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return res, json.loads(out.read_text())


def test_every_method_and_cell_is_timed(run):
    _, r = run
    assert r["kind"] == "kvsurgery-bench"
    assert r["device"]["type"] == "cpu" and r["device"]["cpu_numbers"] is True
    assert r["versions"]["torch"] and r["settings"]["head_dim"] == D
    cells = {(x["method"], x["batch"], x["context"]): x for x in r["decode"]}
    assert set(cells) == {(m, b, c) for m in ALL for b in BATCHES for c in CONTEXTS}
    for (m, b, c), x in cells.items():
        assert x["us"] > 0 and x["eager_us"]["n"] == 3 and x["finite"], (m, b, c)
        dense = cells[("dense", b, c)]["us"]
        assert x["speedup_vs_dense"] == pytest.approx(dense / x["us"])
    # the fp32 reference check ran at the first context of each batch and agrees
    for m in ALL:
        for b in BATCHES:
            assert cells[(m, b, 256)]["rel_err_vs_fp32_ref"] < 1e-4
    assert cells[("clusterkv", 1, 512)]["clusters"] > 1


def test_bytes_are_the_allocated_state(run):
    _, r = run
    cells = {(x["method"], x["batch"], x["context"]): x for x in r["decode"]}
    for b in BATCHES:
        for c in CONTEXTS:
            dense = cells[("dense", b, c)]
            assert dense["bytes_per_token"] == 2 * HKV * D * 4  # K and V, fp32
            kv = cells[("kvdict", b, c)]
            n_c = c - 4 - 32
            cap = -(-n_c // 256) * 256  # codes grow in blocks of 256 tokens
            want = 2 * HKV * 36 * D * 4 + HKV * cap * (4 + 3) * (2 + 1)
            assert kv["cache_bytes"] == b * want
            assert kv["fixed_bytes"] == 2 * D * 64 * 4  # two fp32 dictionaries
            # ClusterKV keeps every token plus its clustering: more than dense
            assert cells[("clusterkv", b, c)]["bytes_per_token"] > dense["bytes_per_token"]


def test_prefill_costs_next_to_prefill_attention(run):
    _, r = run
    pre = {(x["method"], x["context"]): x for x in r["prefill"]}
    assert set(pre) == {(m, c) for m in ALL for c in CONTEXTS}
    for (_m, c), x in pre.items():
        assert x["ms"] > 0 and x["batch"] == 1
        assert x["vs_prefill_attention"] == pytest.approx(x["ms"] / pre[("dense", c)]["ms"])
    assert "OMP" in pre[("kvdict", 256)]["what"] and "k-means" in pre[("clusterkv", 256)]["what"]


def test_table_is_printed_last(run):
    res, r = run
    out = res.stdout
    assert "CPU NUMBERS" in out
    table = results_table(r)
    assert out.rstrip().endswith(table.rstrip())
    lines = table.splitlines()
    row = next(i for i, s in enumerate(lines) if s.startswith("batch") and "dense us" in s)
    assert "kvdict us" in lines[row] and "clusterkv us" in lines[row]
    assert len([s for s in lines[row + 1 :] if s.strip() and s.split()[0].isdigit()]) >= 4


def test_timer_measures_the_step(monkeypatch):
    """A method entry is all the bench needs, and its time is what its step takes."""

    def slow(state, q):
        time.sleep(0.003)
        return bm._dense_step(state, q)

    monkeypatch.setitem(bm.METHODS, "slow", bm.BenchMethod("slow", bm._dense_build, slow))
    cfg = BenchConfig(contexts=(64,), batches=(1,), heads=H, kv_heads=HKV, head_dim=D,
                      dtype="float32", methods=("slow",), repeats=3, warmup=0,
                      prefill=False, threads=1)  # fmt: skip
    r = bm.run_bench(cfg, log=lambda m: None)
    by = {x["method"]: x for x in r["decode"]}
    assert by["slow"]["us"] >= 3000
    assert by["slow"]["us"] > by["dense"]["us"]
    assert by["slow"]["speedup_vs_dense"] < 1


def test_a_failing_method_is_reported_and_the_rest_still_run(monkeypatch):
    """One method raising (say a kernel this Triton cannot compile) is recorded in
    ``failed`` and printed; the other methods and cells are still measured."""

    def broken(state, q):
        raise RuntimeError("PassManager::run failed\nlong compiler dump")

    monkeypatch.setitem(bm.METHODS, "broken", bm.BenchMethod("broken", bm._dense_build, broken))
    monkeypatch.setitem(bm.METHODS, "slow", bm.BenchMethod("slow", bm._dense_build, bm._dense_step))
    cfg = BenchConfig(contexts=(64, 128), batches=(1,), heads=H, kv_heads=HKV, head_dim=D,
                      dtype="float32", methods=("broken", "slow"), repeats=2, warmup=0,
                      prefill=False, threads=1)  # fmt: skip
    r = bm.run_bench(cfg, log=lambda m: None)
    assert {(x["method"], x["context"]) for x in r["decode"]} == {
        (m, c) for m in ("dense", "slow") for c in (64, 128)
    }
    assert r["failed"] == [
        f"decode broken batch 1 context {c}: RuntimeError: PassManager::run failed"
        for c in (64, 128)
    ]
    table = results_table(r)
    assert "# FAILED: decode broken batch 1 context 64: RuntimeError" in table
    assert "broken us" not in table  # no column for a method without a single row


def test_generate_tokens_per_second(tiny_llama_dir, tmp_path):
    out = tmp_path / "g.json"
    res = _run([*TINY, "--contexts", "256", "--no-prefill", "--model", str(tiny_llama_dir),
                "--gen-context", "200", "--gen-tokens", "6", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    gen = json.loads(out.read_text())["generate"]
    rows = {x["method"]: x for x in gen["rows"]}
    assert {"dense", "kvdict", "clusterkv"} <= set(rows) <= set(ALL)
    for x in rows.values():
        assert x["tokens_per_s"] > 0 and x["generate_s"] > x["prefill_s"] > 0
    # the compressed cache was really used: KV-Dict holds fewer bytes than the full cache
    assert rows["kvdict"]["cache_bytes"] < rows["dense"]["cache_bytes"]
    assert "## generate" in res.stdout


def test_plot(tmp_path):
    png = tmp_path / "t.png"
    res = _run([*TINY, "--contexts", "256", "--no-prefill", "--methods", "kvdict",
                "--repeats", "1", "--plot", str(png)])  # fmt: skip
    assert res.exit_code == 0, res.output
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in res.output and not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--heads", "6", "--kv-heads", "4"], "not a multiple"),
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--contexts", "abc"], "not a whole number"),
        (["--contexts", "0"], "must be >= 1"),
        (["--contexts", "36"], "leaves no compressed tokens for kvdict"),
        (["--dtype", "int8"], "--dtype must be one of"),
        (["--s-k", "65"], "cannot exceed --n-atoms"),
        (["--repeats", "0"], "--repeats must be an integer >= 1"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
        (["--subgen-estimator", "mean"], "needs --subgen-max-clusters"),
    ],
)
def test_bad_options_exit_2(args, message):
    res = _run([*TINY, "--contexts", "256", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output


@pytest.mark.skipif("subgen" not in bm.available_methods(), reason="subgen kernels not installed")
def test_subgen_mean_estimator_row(tmp_path):
    out = tmp_path / "b.json"
    res = _run([*TINY, "--methods", "subgen", "--contexts", "512", "--batch", "1",
                "--subgen-estimator", "mean", "--subgen-max-clusters", "24", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["settings"]["subgen_estimator"] == "mean"
    cell = next(x for x in r["decode"] if x["method"] == "subgen")
    assert cell["clusters"] == 24 and cell["rel_err_vs_fp32_ref"] < 1e-4
    dense = next(x for x in r["decode"] if x["method"] == "dense")
    # exact sinks + window (36 tokens) and 24 means of 512 tokens: a tenth of dense
    assert cell["cache_bytes"] < dense["cache_bytes"] * 0.15


def test_clusterkv_estimate_rest_and_spread_ranking_row(tmp_path):
    out = tmp_path / "b.json"
    res = _run([*TINY, "--methods", "clusterkv", "--contexts", "512", "--batch", "2",
                "--cluster-estimate-rest", "--cluster-spread-ranking", "--no-prefill",
                "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["settings"]["cluster_estimate_rest"] is True and "estimate_rest" in res.output
    assert r["settings"]["cluster_spread_ranking"] is True and "spread_ranking" in res.output
    cell = next(x for x in r["decode"] if x["method"] == "clusterkv")
    assert cell["rel_err_vs_fp32_ref"] < 1e-4  # the reference merges the estimate too
    assert cell["clusters"] > 1
