"""The command line: thin wrappers, clear errors (exit 2, no traceback)."""

import json

from click.testing import CliRunner

from kvsurgery.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_calibrate_capture_only_and_with_recipe(tiny_llama_dir, tmp_path):
    r = run(
        "calibrate",
        "--model",
        tiny_llama_dir,
        "--samples",
        2,
        "--seq-len",
        64,
        "--max-vectors",
        256,
        "--out",
        tmp_path / "a",
    )
    assert r.exit_code == 0, r.output
    assert "k-means cos@16" in r.output and (tmp_path / "a" / "manifest.json").is_file()
    recipe = tmp_path / "kv.yaml"
    recipe.write_text(
        "method: kvdict\nn_atoms: 32\ns_k: 3\ns_v: 3\niters: 2\ncalibration: {samples: 3, seq_len: 64}\n"
    )
    r = run(
        "calibrate",
        "--model",
        tiny_llama_dir,
        "--recipe",
        recipe,
        "--set",
        "n_atoms=48",
        "--out",
        tmp_path / "b",
    )
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert man["data"]["samples"] == 3 and man["recipes"]["kvdict"]["n_atoms"] == 48
    assert man["methods"]["kvdict"]["layers"][0]["n_atoms_k"] == 48
    assert "K rel.err" in r.output


def test_bad_recipe_fails_before_the_model_is_loaded(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("method: kvdict\nsparsity: 3\n")
    # the model does not exist either: the recipe error must come first
    r = run("calibrate", "--model", tmp_path / "nope", "--recipe", recipe, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "error: sparsity: unknown key" in r.output
    assert not (tmp_path / "o").exists()
    r = run(
        "calibrate",
        "--model",
        tmp_path / "nope",
        "--recipe",
        recipe.with_name("ok.yaml"),
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 2 and "does not exist" in r.output
    good = tmp_path / "good.yaml"
    good.write_text("method: kvdict\n")
    r = run(
        "calibrate",
        "--model",
        tmp_path / "nope",
        "--recipe",
        good,
        "--set",
        "atoms=3",
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 2 and "--set atoms: no recipe given has that key" in r.output


def test_model_and_seq_len_errors(tiny_llama_dir, tmp_path):
    r = run("calibrate", "--model", tmp_path, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "has no config.json" in r.output
    r = run("calibrate", "--model", tiny_llama_dir, "--seq-len", 5000, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "exceeds the model's maximum of 2048" in r.output


def test_export_errors(tmp_path):
    r = run("export", "--calibration", tmp_path, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "is not a calibration folder" in r.output


def test_export_puts_eval_table_in_card(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "kv.yaml"
    recipe.write_text("method: kvdict\nn_atoms: 32\ns_k: 3\ns_v: 3\niters: 2\n")
    r = run(
        "calibrate",
        "--model",
        tiny_llama_dir,
        "--recipe",
        recipe,
        "--samples",
        2,
        "--seq-len",
        64,
        "--out",
        tmp_path / "cal",
    )
    assert r.exit_code == 0, r.output
    (tmp_path / "ev").mkdir()
    r = run(
        "export",
        "--calibration",
        tmp_path / "cal",
        "--out",
        tmp_path / "x",
        "--eval-results",
        tmp_path / "ev",
    )
    assert r.exit_code == 2 and "has no results.md" in r.output
    (tmp_path / "ev" / "results.md").write_text("| method | ppl |\n|---|---|\n| kvdict | 1.01 |\n")
    r = run(
        "export",
        "--calibration",
        tmp_path / "cal",
        "--out",
        tmp_path / "x",
        "--eval-results",
        tmp_path / "ev",
    )
    assert r.exit_code == 0, r.output
    card = (tmp_path / "x" / "README.md").read_text()
    assert "| kvdict | 1.01 |" in card and "trust_remote_code=True" in card


def test_demo_prompt_length_and_summary_ratios(tiny_llama_dir):
    """The demo prompt reaches the requested length (many built-in documents joined), and the
    summary reports bytes per token against fp16 and against the dense cache of the run."""
    from transformers import AutoTokenizer

    from kvsurgery.demo import demo_prompt, summarize

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for n in (50, 3000):
        ids = tok(demo_prompt(tok, n), add_special_tokens=False)["input_ids"]
        assert n <= len(ids) <= n + 20
    run = {"tokens": [1, 2], "text": "", "cache_type": "X", "cached_tokens": 100}
    res = {
        "compressed": {**run, "cache_bytes": 100 * 300},
        "dense": {**run, "cache_type": "DynamicCache", "cache_bytes": 100 * 2000},
        "fp16_bytes_per_token": 1000,
        "dtype": "float32",
    }
    s = summarize(res)
    assert s["kv_memory_vs_fp16"] == "30.0%" and s["kv_memory_vs_dense_cache_same_run"] == "15.0%"
    assert s["model_dtype"] == "float32" and s["greedy_tokens_equal_to_dense"] == "2/2"
