"""Export -> from_pretrained(trust_remote_code) in a fresh process -> compressed decoding.

Covers: toolkit-free loading (kvsurgery blocked, empty modules cache, offline), round-trip
fidelity with the in-process compressed model, save/load stability, fp32 dictionaries under
bf16/fp16 loads, corrupt checkpoints, inspect, push with a fake Hub client, Hub-cache load,
and every supported architecture.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from kvsurgery.calibrate import calibrate
from kvsurgery.demo import run_fresh_process
from kvsurgery.errors import KVSurgeryError
from kvsurgery.export import apply_to_model, export, inspect_checkpoint, push
from kvsurgery.models import load_model
from kvsurgery.recipes import CalibrationConfig, recipe_from_dict
from kvsurgery.runtime.kvs_attention import ATTN_NAME
from kvsurgery.runtime.kvs_methods import build_cache

RECIPE = {
    "method": "kvdict",
    "n_atoms": 64,
    "s_k": 4,
    "s_v": 4,
    "iters": 3,
    "sinks": 2,
    "buffer": 8,
    "flush": 4,
}
PROMPT = "the of and to a in is that for the of and to a in is that it as"


def make_export(folder, tmp, arch="llama"):
    loaded = load_model(folder)
    calibrate(
        None,
        tmp / "cal",
        recipes=[recipe_from_dict(RECIPE)],
        settings=CalibrationConfig(samples=4, seq_len=64, max_vectors=2000),
        loaded=loaded,
        progress=False,
    )
    out = export(tmp / "cal", tmp / "exp", loaded=load_model(folder))
    return out


def in_process_tokens(folder, cal, prompt=PROMPT, n=20):
    model, tok, _ = load_model(folder)
    apply_to_model(model, cal)
    model.set_attn_implementation(ATTN_NAME)
    ids = tok(prompt, return_tensors="pt")
    cache = build_cache(model)
    out = model.generate(
        **ids,
        max_new_tokens=n,
        do_sample=False,
        past_key_values=cache,
        pad_token_id=tok.pad_token_id,
    )
    assert any(getattr(layer, "n_comp", 0) > 0 for layer in cache.layers)  # codes were read
    return out[0, ids["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    return make_export(tiny_llama_dir, tmp), tmp


def test_export_folder_contents(exported):
    out, _ = exported
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "modeling_kvsurgery.py",
        "kvs_cache.py",
        "kvs_attention.py",
        "omp.py",
        "kvdict_attention.py",
        "tokenizer.json",
    } <= names
    assert not any(n.startswith(".") for n in names) and not list(out.parent.glob(".exp.tmp-*"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_kvsurgery.KVSurgeryForCausalLM"
    block = cfg["kvsurgery"]
    assert (
        block["format_version"] == 1 and block["method"] == "kvdict" and len(block["layers"]) == 2
    )
    assert block["recipe"]["n_atoms"] == 64 and block["calibration"]["data"]["samples"] == 4
    for py in out.glob("*.py"):
        text = py.read_text()
        assert (
            "kvsurgery." not in text.replace("kvsurgery.runtime", "")
            or "import kvsurgery" not in text
        )
        assert (
            "from .." not in text
            and "import kvsurgery" not in text
            and "from kvsurgery" not in text
        )
    assert 'BASE_CLASS = "LlamaForCausalLM"' in (out / "modeling_kvsurgery.py").read_text()
    weights = load_file(out / "model.safetensors")
    dk = weights["model.layers.0.self_attn.kvsurgery_dk"]
    assert dk.dtype == torch.float32 and dk.shape == (16, 64)
    kmap = weights["model.layers.0.self_attn.kvsurgery_kmap"]  # query_weighting is on by default
    assert block["key_map"] is True and kmap.dtype == torch.float32 and kmap.shape == (2, 16, 16)
    torch.testing.assert_close(kmap, kmap.transpose(1, 2))  # symmetric positive definite
    assert bool((torch.linalg.eigvalsh(kmap) > 0).all())


def test_fresh_process_without_toolkit_equals_in_process(exported, tiny_llama_dir, tmp_path):
    out, tmp = exported
    res = run_fresh_process(out, PROMPT, 20)  # kvsurgery blocked by a meta-path hook
    assert res["compressed"]["cache_type"] == "KVSurgeryCache"
    assert res["dense"]["cache_type"] == "DynamicCache"
    assert res["compressed"]["tokens"] == in_process_tokens(tiny_llama_dir, tmp / "cal")


def test_fresh_process_empty_modules_cache(exported, tmp_path):
    out, _ = exported
    code = (
        "import sys, os\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "import transformers.utils.hub as h; print('MOD', type(m).__name__, os.environ['HF_MODULES_CACHE'])\n"
    )
    env = {
        "HF_MODULES_CACHE": str(tmp_path / "mods"),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "PYTHONSAFEPATH": "1",
    }
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "MOD KVSurgeryForCausalLM" in p.stdout
    assert list((tmp_path / "mods").rglob("modeling_kvsurgery.py"))


def test_save_load_save_load_stable_and_fp32_dictionaries(exported, tmp_path):
    out, _ = exported
    m1 = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert (
        m1.config._attn_implementation == ATTN_NAME and type(m1).__name__ == "KVSurgeryForCausalLM"
    )
    m1.save_pretrained(tmp_path / "a")
    for f in out.glob("*.py"):
        assert (tmp_path / "a" / f.name).is_file()
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True)
    m2.save_pretrained(tmp_path / "b")
    a, b = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((tmp_path / "a/config.json").read_text())["kvsurgery"]
        == json.loads((tmp_path / "b/config.json").read_text())["kvsurgery"]
    )
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])
    g1 = m1.generate(ids, max_new_tokens=10, do_sample=False)
    g2 = m2.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(g1, g2)
    for dtype in (torch.bfloat16, torch.float16):
        m = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=dtype)
        attn = m.model.layers[1].self_attn
        assert attn.q_proj.weight.dtype == dtype
        assert attn.kvsurgery_dk.dtype == torch.float32 and attn.kvsurgery_dv.dtype == torch.float32
        assert attn.kvsurgery_kmap.dtype == torch.float32
        torch.testing.assert_close(
            attn.kvsurgery_dk, m1.model.layers[1].self_attn.kvsurgery_dk, rtol=0, atol=0
        )
        m.generate(ids, max_new_tokens=3, do_sample=False)  # runs in low precision


def test_sdpa_turns_compression_off(exported):
    out, _ = exported
    m = AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, attn_implementation="sdpa"
    )
    res = m.generate(
        torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]),
        max_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
    )
    assert type(res.past_key_values).__name__ == "DynamicCache"


def _copy(out, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    return bad


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "damage, match",
    [
        ("missing_tensor", r"layer 1 kvsurgery_dv was not loaded"),
        ("version", r"format_version is 99 but this runtime reads version 1"),
        ("sparsity", r"layers\[0\]: sparsity exceeds the number of atoms"),
        ("layers", r"must list 2 layers"),
        ("shape", r"weights do not match its config.json: a tensor has another shape"),
        ("not_unit", r"atoms are not unit-norm"),
        ("missing_map", r"layer 0 kvsurgery_kmap was not loaded"),
        ("singular_map", r"layer 1 kvsurgery_kmap is singular"),
        ("map_flag", r"key_map must be true or false"),
    ],
)
def test_corrupt_checkpoints_fail_at_load(exported, tmp_path, damage, match):
    out, _ = exported
    bad = _copy(out, tmp_path)
    w = load_file(bad / "model.safetensors")
    if damage == "missing_tensor":
        del w["model.layers.1.self_attn.kvsurgery_dv"]
    elif damage == "not_unit":
        w["model.layers.0.self_attn.kvsurgery_dk"] *= 2
    elif damage == "missing_map":
        del w["model.layers.0.self_attn.kvsurgery_kmap"]
    elif damage == "singular_map":
        w["model.layers.1.self_attn.kvsurgery_kmap"][0, :, 0] = 0
    elif damage == "map_flag":
        _edit_config(bad, lambda c: c["kvsurgery"].update(key_map="yes"))
    elif damage == "version":
        _edit_config(bad, lambda c: c["kvsurgery"].update(format_version=99))
    elif damage == "sparsity":
        _edit_config(bad, lambda c: c["kvsurgery"]["layers"][0].update(s_k=65))
    elif damage == "layers":
        _edit_config(bad, lambda c: c["kvsurgery"]["layers"].pop())
    elif damage == "shape":
        _edit_config(bad, lambda c: c["kvsurgery"]["layers"][0].update(n_atoms_k=32))
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match=match):
        AutoModelForCausalLM.from_pretrained(bad, trust_remote_code=True)


def test_inspect_reports_problems(exported, tmp_path):
    out, _ = exported
    rep = inspect_checkpoint(out)
    assert rep["loads_compressed"] and rep["compressed_layers"] == 2 and rep["learned_tensors"] == 6
    bad = _copy(out, tmp_path)
    (bad / "kvs_cache.py").unlink()
    _edit_config(bad, lambda c: c.pop("auto_map"))
    rep = inspect_checkpoint(bad)
    assert not rep["loads_compressed"]
    assert any("auto_map" in p for p in rep["problems"]) and any(
        "kvs_cache.py" in p for p in rep["problems"]
    )
    from click.testing import CliRunner

    from kvsurgery.cli import main

    r = CliRunner().invoke(main, ["inspect", str(bad)])
    assert r.exit_code == 1 and '"loads_compressed": false' in r.output


def test_without_trust_remote_code_loads_base_model_card_warns(exported):
    out, _ = exported
    m = AutoModelForCausalLM.from_pretrained(out)
    assert type(m).__name__ == "LlamaForCausalLM"  # silently dense: the card must say so
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "silently loads" in card


def test_existing_output_is_not_clobbered(exported, tiny_llama_dir):
    out, tmp = exported
    with pytest.raises(KVSurgeryError, match="already exists.*--overwrite"):
        export(tmp / "cal", out, loaded=load_model(tiny_llama_dir))


def test_interrupted_export_leaves_nothing(exported, tiny_llama_dir, tmp_path, monkeypatch):
    _, tmp = exported
    from kvsurgery import export as ex

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "model_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export(tmp / "cal", tmp_path / "new", loaded=load_model(tiny_llama_dir))
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*"))


class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private, exist_ok, repo_type):
        self.calls.append(("create_repo", repo_id, private))
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
        from pathlib import Path

        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(
            ("upload_folder", repo_id, files, (Path(folder_path) / "README.md").read_text())
        )


def test_push_with_injected_client(exported):
    out, _ = exported
    api = FakeApi()
    url = push(out, "org/tiny-kvdict", private=True, api=api)
    assert url.endswith("org/tiny-kvdict")
    assert api.calls[0] == ("create_repo", "org/tiny-kvdict", True)
    _, repo, files, card = api.calls[1]
    assert repo == "org/tiny-kvdict"
    assert set(files) >= {
        "config.json",
        "model.safetensors",
        "modeling_kvsurgery.py",
        "kvs_cache.py",
        "README.md",
    }
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "kvsurgery" in meta["tags"] and "kvdict" in meta["tags"]
    assert 'from_pretrained("org/tiny-kvdict", trust_remote_code=True)' in card


def test_push_refuses_incomplete_checkpoint(exported, tmp_path):
    out, _ = exported
    bad = _copy(out, tmp_path)
    (bad / "omp.py").unlink()
    with pytest.raises(KVSurgeryError, match="not a complete kvsurgery checkpoint.*omp.py"):
        push(bad, "org/x", api=FakeApi())


def test_hub_download_loads_like_local_folder(exported, tmp_path):
    """A pre-populated Hub cache with HF_HUB_OFFLINE=1 stands in for a download."""
    out, _ = exported
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-kvdict"
    shutil.copytree(out, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained('org/tiny-kvdict', trust_remote_code=True)\n"
        "ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])\n"
        "print('TOK', json.dumps(m.generate(ids, max_new_tokens=8, do_sample=False)[0].tolist()))\n"
    )
    env = {
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "mods"),
        "PATH": "/usr/bin:/bin",
        "PYTHONSAFEPATH": "1",
    }
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert p.returncode == 0, p.stderr[-2000:]
    hub_tokens = json.loads(p.stdout.split("TOK ")[1])
    local = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])
    assert hub_tokens == local.generate(ids, max_new_tokens=8, do_sample=False)[0].tolist()


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_export_other_architectures(tiny_dirs, tmp_path, arch):
    folder = tiny_dirs(arch)
    out = make_export(folder, tmp_path, arch)
    res = run_fresh_process(out, PROMPT, 12)
    assert res["compressed"]["cache_type"] == "KVSurgeryCache"
    assert res["compressed"]["tokens"] == in_process_tokens(folder, tmp_path / "cal", n=12)


def test_softcapping_refused_by_methods_without_it(tiny_dirs):
    from kvsurgery.export import apply_default

    model, _, _ = load_model(tiny_dirs("gemma2"))
    with pytest.raises(KVSurgeryError, match="softcapping"):
        apply_default(model, "clusterkv")


def test_protected_tokens_calibrate_export_and_load_in_fresh_process(tiny_llama_dir, tmp_path):
    """``protect`` is paid for in the byte target (int8 protected tokens about half, int4
    ones less), reaches the block and the card, and the export protects the same tokens
    (int4) in a fresh process as the toolkit does in-process."""
    from kvsurgery.sparsity import compression_ratio

    budget = {"target_ratio": 0.5, "target_context": 64, "s_min": 1, "s_max": 8}
    atoms = {}
    for protect, dtype in ((0, "model"), (8, "model"), (8, "int8"), (8, "int4")):
        recipe = recipe_from_dict({**RECIPE, **budget, "protect": protect, "protect_dtype": dtype})
        man = calibrate(
            None,
            tmp_path / "cal",
            recipes=[recipe],
            settings=CalibrationConfig(samples=4, seq_len=64, max_vectors=2000),
            loaded=load_model(tiny_llama_dir),
            progress=False,
        )
        layers = man["methods"]["kvdict"]["layers"]
        s_k, s_v = [p["s_k"] for p in layers], [p["s_v"] for p in layers]
        # int8 + a 2-byte scale per vector; int4 + a 2-byte step and minimum (one group)
        cost = {"model": 1.0, "int8": (16 + 2) / 32, "int4": (8 + 4) / 32}[dtype]
        ratio = compression_ratio(
            s_k, s_v, d=16, exact_fraction=10 / 64, protected_fraction=protect / 64 * cost
        )
        assert ratio <= 0.5
        atoms[protect, dtype] = sum(s_k) + sum(s_v)
        if protect:
            out = export(
                tmp_path / "cal", tmp_path / f"exp-{dtype}", loaded=load_model(tiny_llama_dir)
            )
            block = json.loads((out / "config.json").read_text())["kvsurgery"]
            card = (out / "README.md").read_text()
            assert block["protect"] == 8
            if dtype != "model":
                assert block["protect_dtype"] == dtype
                assert f"| protected prompt tokens | 8 ({dtype}) |" in card
            else:  # as exports before protect_dtype
                assert "protect_dtype" not in block and "| protected prompt tokens | 8 |" in card
    # the protected tokens' bytes come out of the codes, int8 ones about half as many,
    # int4 ones fewer still
    assert atoms[8, "model"] < atoms[8, "int8"] <= atoms[8, "int4"] < atoms[0, "model"]
    prompt = " ".join([PROMPT] * 2)
    res = run_fresh_process(out, prompt, 12)
    model, tok, _ = load_model(tiny_llama_dir)
    apply_to_model(model, tmp_path / "cal")
    model.set_attn_implementation(ATTN_NAME)
    ids = tok(prompt, return_tensors="pt")
    cache = build_cache(model)
    mine = model.generate(**ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert res["compressed"]["tokens"] == mine[0, ids["input_ids"].shape[1] :].tolist()
    layer = cache.layers[0]
    assert layer.kept_k.dtype == torch.uint8  # the last export: int4, two channels a byte
    assert layer.kept_pos.shape == (1, 8) and (layer.kept_pos >= 2).all()
