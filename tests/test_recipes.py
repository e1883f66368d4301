"""Recipes: validation names the key, precedence defaults < recipe < CLI, per-layer overrides."""

import pytest

from kvsurgery.recipes import (
    KVDictConfig,
    RecipeError,
    apply_overrides,
    load_recipe,
    parse_set_options,
    recipe_from_dict,
    resolve_calibration,
)


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_shipped_recipes_load():
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))
    assert files
    for f in files:
        r = load_recipe(f)
        assert r.method == f.stem.split("-")[0]  # recipes/<method>[-variant].yaml


def test_precedence_defaults_recipe_cli(tmp_path):
    r = load_recipe(
        write(tmp_path, "method: kvdict\nn_atoms: 512\ncalibration: {samples: 3, seq_len: 64}\n")
    )
    assert r.config.n_atoms == 512 and r.config.s_k == KVDictConfig().s_k
    r2 = apply_overrides(r, parse_set_options(["n_atoms=256", "target_ratio=0.2"]))
    assert r2.config.n_atoms == 256 and r2.config.target_ratio == 0.2
    cal = resolve_calibration([r], {"samples": 5, "seq_len": None})
    assert cal.samples == 5 and cal.seq_len == 64 and cal.max_vectors == 65536


@pytest.mark.parametrize(
    "text, match",
    [
        ("method: kvdict\nn_atom: 5\n", r"n_atom: unknown key"),
        ("method: kvdict\nn_atoms: many\n", r"n_atoms: expected int, got str"),
        ("method: kvdict\nn_atoms: 40000\n", r"n_atoms: must be in 1..32767"),
        ("method: kvdict\ns_k: 0\n", r"s_k: must be >= 1"),
        ("method: kvdict\ntarget_ratio: 0.2\nmax_error: 0.1\n", r"target_ratio: give either"),
        ("method: kvdict\ntarget_ratio: 1.5\n", r"target_ratio: must be in \(0, 1\]"),
        ("method: nope\n", r"method: .*must be one of"),
        ("method: kvdict\ncalibration: {samples: 0}\n", r"calibration.samples: must be > 0"),
        ("method: kvdict\ncalibration: {sample: 3}\n", r"calibration.sample: unknown key"),
        (
            "method: kvdict\nlayers: {'0-1': {n_atoms: 3}}\n",
            r"layers.0-1.n_atoms: cannot be set per layer",
        ),
        ("method: kvdict\nlayers: {'x y': {s_k: 3}}\n", r"layers.x y: a layer selector"),
        ("method: kvdict\nlayers: {'1': {s_k: 0}}\n", r"layers.1.s_k: must be >= 1"),
        ("method: kvdict\nbuffer: true\n", r"buffer: expected int, got bool"),
        ("method: kvdict\nprotect: -1\n", r"protect: must be >= 0"),
        (
            "method: kvdict\nallocation: attn\n",
            r"allocation: must be one of reconstruction, attention, got 'attn'",
        ),
        (
            "method: kvdict\nprotect_dtype: fp8\n",
            r"protect_dtype: must be one of model, int8, int4, got 'fp8'",
        ),
        (
            "method: kvdict\nbuffer: 64\nprotect: 30\ntarget_context: 98\n",
            r"protect: sinks \+ buffer",
        ),
        ("[1, 2]\n", r"a recipe is a mapping"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(write(tmp_path, text))


def test_protect_dtypes_are_the_runtimes():
    from kvsurgery.recipes import PROTECT_DTYPES
    from kvsurgery.runtime import kvs_cache

    assert PROTECT_DTYPES == kvs_cache.PROTECT_DTYPES


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "method: [kvdict\n"))
    with pytest.raises(RecipeError, match="expected key=value"):
        parse_set_options(["n_atoms"])


def test_per_layer_overrides_by_index_range_glob_and_type():
    r = recipe_from_dict(
        {
            "method": "kvdict",
            "layers": {
                "0-1": {"s_k": 4},
                "5,7": {"dense": True},
                "1*": {"s_v": 3},
                "sliding_attention": {"s_k": 12},
            },
        }
    )
    assert r.for_layer(0).s_k == 4 and r.for_layer(1).s_k == 4 and r.for_layer(2).s_k == 8
    assert r.for_layer(5).dense and r.for_layer(7).dense and not r.for_layer(6).dense
    assert r.for_layer(12).s_v == 3 and r.for_layer(1).s_v == 3 and r.for_layer(2).s_v == 8
    assert r.for_layer(3, "sliding_attention").s_k == 12
