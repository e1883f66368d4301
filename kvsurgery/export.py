"""`kvsurgery export`, `inspect` and `push`: augmented checkpoints that load with
``from_pretrained(..., trust_remote_code=True)`` and decode with a compressed cache.

An export folder holds the weights (safetensors, sharded as ``save_pretrained`` does) with
the dictionaries as fp32 buffers of the attention modules, config.json with ``auto_map``
and a versioned ``kvsurgery`` block, the tokenizer, a model card, and the runtime code
copied flat (modeling file, cache layer, attention routing, Triton kernels with their
torch references). It is written to a temporary folder and renamed at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from . import FORMAT_VERSION, __version__
from .calibrate import method_module, read_manifest
from .errors import KVSurgeryError
from .models import load_model, model_dims

_PKG = Path(__file__).resolve().parent
_RUNTIME = _PKG / "runtime"
MODELING_FILE = "modeling_kvsurgery.py"
MODEL_CLASS = "KVSurgeryForCausalLM"


def runtime_sources() -> dict[str, str]:
    """The runtime files as they are written into an export: flat, no kvsurgery imports."""
    from . import kernels

    kernel_dir = Path(kernels.__file__).resolve().parent
    files = {p.name: p for p in sorted(_RUNTIME.glob("*.py")) if p.name != "__init__.py"}
    for path in sorted(kernel_dir.glob("*.py")):
        if path.name != "__init__.py":
            files[path.name] = path
    out = {}
    for name, path in files.items():
        text = path.read_text()
        # Remote code must be flat: sibling imports only, as `from .name import x`.
        text = re.sub(r"from \.\.kernels\.(\w+) import", r"from .\1 import", text)
        if re.search(r"^\s*(from|import)\s+kvsurgery\b|from \.\.", text, re.M):
            raise RuntimeError(f"{name} imports the kvsurgery package; runtime files must be flat")
        out[name] = text
    return out


def set_base_class(modeling_text: str, base_class: str) -> str:
    new, n = re.subn(
        r'^BASE_CLASS = "\w+"$', f'BASE_CLASS = "{base_class}"', modeling_text, flags=re.M
    )
    if n != 1:
        raise RuntimeError("modeling template has no BASE_CLASS line")
    return new


def build_block(manifest: dict, method: str) -> dict:
    """The versioned ``kvsurgery`` config block for ``method`` from a calibration manifest."""
    entry = manifest.get("methods", {}).get(method)
    if entry is None:
        raise KVSurgeryError(
            f"the calibration has no {method!r} results (it has {sorted(manifest.get('methods', {}))}); "
            f"run `kvsurgery calibrate --recipe recipes/{method}.yaml` first."
        )
    return {
        "format_version": FORMAT_VERSION,
        "method": method,
        **method_module(method).runtime_block(entry),
        "recipe": manifest["recipes"].get(method),
        "calibration": {
            "model": manifest["model"],
            "data": manifest["data"],
            "created": manifest["created"],
            "settings": manifest["settings"],
            "versions": manifest["versions"],
        },
        "exported_with": {
            "kvsurgery": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }


def apply_to_model(model, calib_dir, method: str = "kvdict") -> dict:
    """Patch a loaded model in place so it decodes compressed (no files written).

    Returns the config block. Use ``kvsurgery.runtime.kvs_cache.build_cache(model)`` as
    ``past_key_values``. This is the in-process twin of an exported checkpoint.
    """
    from .runtime.kvs_attention import install

    manifest = read_manifest(calib_dir)
    block = build_block(manifest, method)
    _refuse_softcapping(model, method)
    dims = model_dims(model.config)
    if dims != manifest["dims"]:
        raise KVSurgeryError(
            f"the model's attention dimensions {dims} differ from the calibrated model's "
            f"{manifest['dims']}; export with the model the calibration was made on."
        )
    entry = manifest["methods"][method]
    install(model, block, method_module(method).load_tensors(calib_dir, entry))
    return block


def apply_default(model, method: str, recipe=None) -> dict:
    """Install a training-free method from its recipe defaults (no calibration); returns the
    config block. Methods that need learned tensors (KV-Dict) refuse."""
    from .recipes import default_recipe
    from .runtime.kvs_attention import install

    mod = method_module(method)
    if not hasattr(mod, "default_entry"):
        raise KVSurgeryError(
            f"{method} needs a calibration (it learns tensors); run `kvsurgery calibrate "
            f"--recipe recipes/{method}.yaml` and pass the folder."
        )
    recipe = recipe or default_recipe(method)
    entry = mod.default_entry(model_dims(model.config), recipe)
    block = {
        "format_version": FORMAT_VERSION,
        "method": method,
        **mod.runtime_block(entry),
        "recipe": recipe.to_dict(),
        "calibration": None,
    }
    _refuse_softcapping(model, method)
    install(model, block, {})
    return block


def _refuse_softcapping(model, method: str) -> None:
    from .runtime.kvs_methods import method_runtime

    cap = getattr(model.config.get_text_config(decoder=True), "attn_logit_softcapping", None)
    if cap and not getattr(method_runtime(method), "SUPPORTS_SOFTCAP", False):
        raise KVSurgeryError(
            f"{type(model).__name__} uses attention logit softcapping ({cap}), which the "
            f"{method} decode path does not implement yet (KV-Dict does); its compressed "
            "outputs would be wrong."
        )


def export(
    calib_dir: str | Path,
    out_dir: str | Path,
    *,
    method: str = "kvdict",
    model: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    loaded=None,
    eval_table: str | None = None,
) -> Path:
    """Write an augmented checkpoint to ``out_dir`` atomically; returns its path."""
    calib_dir = Path(calib_dir)
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise KVSurgeryError(f"{out} already exists; choose another --out or pass --overwrite.")
    manifest = read_manifest(calib_dir)
    if loaded is None:
        source = model or manifest["model"]["source"]
        loaded = load_model(source, dtype=dtype)
    hf_model, tok, info = loaded
    block = apply_to_model(hf_model, calib_dir, method)
    base_class = type(hf_model).__name__
    import transformers

    if getattr(transformers, base_class, None) is not type(hf_model):
        raise KVSurgeryError(
            f"{base_class} is not a transformers class; only transformers models can be exported."
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        cfg = hf_model.config
        cfg.kvsurgery = block
        cfg.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{MODEL_CLASS}"}
        cfg.architectures = [MODEL_CLASS]
        hf_model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for name, text in runtime_sources().items():
            if name == MODELING_FILE:
                text = set_base_class(text, base_class)
            (tmp / name).write_text(text)
        (tmp / "README.md").write_text(model_card(block, info, eval_table))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{int(time.time())}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        # The live model keeps working as before, but its config must not claim remote code.
        for attr in ("kvsurgery", "auto_map"):
            if hasattr(hf_model.config, attr):
                delattr(hf_model.config, attr)
        hf_model.config.architectures = [base_class]
    return out


LOAD_SNIPPET = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo}")
inputs = tokenizer("The quick brown fox", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=32)  # decodes with the compressed KV cache
print(tokenizer.decode(out[0]))
```"""


def model_card(
    block: dict, info, eval_table: str | None = None, repo: str = "PATH_OR_REPO_ID"
) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    base = info.base_model or None
    data = ModelCardData(
        base_model=base,
        base_model_relation="adapter" if base else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["kvsurgery", "kv-cache-compression", block["method"], "custom_code"],
        datasets=None
        if str(block["calibration"]["data"]["name"]).startswith("builtin:")
        else [block["calibration"]["data"]["name"]],
    )
    layers = block["layers"]
    comp = [p for p in layers if not p.get("dense")]
    mod = method_module(block["method"])
    if hasattr(mod, "card_sections"):  # a method describing itself: (about, settings rows)
        about, rows = mod.card_sections(block, info, __version__)
    else:
        about, rows = _kvdict_card(block, info, comp)
    cal = block["calibration"]
    if cal:
        rows += (
            f"\n| calibration data | {cal['data']['name']} ({cal['data']['samples']} × "
            f"{cal['data']['seq_len']} tokens) |"
        )
    text = f"""---
{data.to_yaml()}
---

# {block["method"]} compressed KV cache for {info.base_model or info.source}

{about}

**Load it with `trust_remote_code=True`.** Without it, transformers silently loads the
plain base model (the dictionaries are reported as unexpected weights) and compression is
off. `kvsurgery inspect <folder>` tells what a checkpoint holds and how it will load.

{LOAD_SNIPPET.format(repo=repo)}

`attn_implementation="sdpa"` (`"eager"` for models with logit softcapping, e.g. Gemma2) or
an explicit `past_key_values` turns compression off.

## Settings

| | value |
|---|---|
| compressed layers | {len(comp)} of {len(layers)} |
{rows}

## Measured quality and memory

{eval_table or "Not measured for this export yet: run `kvsurgery eval --model <this folder>`."}
"""
    ModelCard(text)  # parses the metadata block: a malformed card fails here, not on the Hub
    return text


def _kvdict_card(block: dict, info, comp: list) -> tuple[str, str]:
    mean_sk = sum(p["s_k"] for p in comp) / max(len(comp), 1)
    mean_sv = sum(p["s_v"] for p in comp) / max(len(comp), 1)
    about = f"""This checkpoint is `{info.base_model or info.source}` with a **KV-Dict** compressed KV cache
(sparse codes over per-layer dictionaries, arXiv 2412.08890), produced by kvsurgery
{__version__}. The weights are unchanged; the checkpoint adds one key and one value
dictionary per layer and the runtime code that decodes with them."""
    protect = block.get("protect", 0)
    stored = block.get("protect_dtype", "model")
    if protect:
        kept = {
            "int8": "kept in int8 (one scale per token and head)",
            "int4": "kept in int4 (a step and a minimum per group of channels)",
        }.get(stored, "also kept exact")
        about += f"""
When a prompt is compressed, the {protect} prompt tokens its last queries attend to most
are {kept} (a question at the end of the prompt keeps the passage it asks about)."""
    rows = f"""| mean non-zeros per key / value | {mean_sk:.2f} / {mean_sv:.2f} |
| exact sinks / recent buffer | {block["sinks"]} / {block["buffer"]} tokens |
| protected prompt tokens | {protect}{f" ({stored})" if protect and stored != "model" else ""} |
| compressed-token bytes vs fp16 | {block["code_bytes_ratio"]:.1%} |"""
    return about, rows


def inspect_checkpoint(folder: str | Path) -> dict:
    """What a checkpoint holds and whether it will load compressed."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise KVSurgeryError(f"{folder} has no config.json; pass an exported checkpoint folder.")
    cfg = json.loads(cfg_path.read_text())
    block = cfg.get("kvsurgery")
    report = {
        "folder": str(folder),
        "model_type": cfg.get("model_type"),
        "is_kvsurgery": block is not None,
        "problems": [],
    }
    if block is None:
        report["problems"].append("no `kvsurgery` block in config.json: a plain checkpoint")
        report["loads_compressed"] = False
        return report
    report["method"] = block.get("method")
    report["format_version"] = block.get("format_version")
    if block.get("format_version") != FORMAT_VERSION:
        report["problems"].append(
            f"format_version {block.get('format_version')} is not {FORMAT_VERSION} (this kvsurgery)"
        )
    auto = (cfg.get("auto_map") or {}).get("AutoModelForCausalLM", "")
    if not auto:
        report["problems"].append(
            "config.json has no auto_map: from_pretrained will load the base model"
        )
    for name in runtime_sources():
        if not (folder / name).is_file():
            report["problems"].append(f"runtime file {name} is missing")
    layers = block.get("layers") or []
    report["layers"] = len(layers)
    report["compressed_layers"] = sum(1 for p in layers if not p.get("dense"))
    report["code_bytes_ratio"] = block.get("code_bytes_ratio")
    weight_keys = _weight_keys(folder)
    from .runtime.kvs_methods import METHODS as RUNTIMES
    from .runtime.kvs_methods import buffer_names

    # ClusterKV and SubGen store no tensors
    buffers = buffer_names(block) if block.get("method") in RUNTIMES else ()
    need = []
    for i, p in enumerate(layers):
        if not p.get("dense"):
            need += [f".layers.{i}.self_attn.{b}" for b in buffers]
    missing = [n for n in need if not any(k.endswith(n) for k in weight_keys)]
    if missing:
        report["problems"].append(f"{len(missing)} learned tensors missing, e.g. {missing[0]}")
    report["learned_tensors"] = len(need) - len(missing)
    report["loads_compressed"] = not report["problems"]
    report["how_to_load"] = "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)"
    return report


def _weight_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            keys += list(h.keys())
    return keys


def push(folder: str | Path, repo_id: str, *, private: bool = False, api=None, token=None) -> str:
    """Create ``repo_id`` on the Hub and upload the export folder; returns the repo URL.

    ``api``: an ``HfApi``-like object (injected in tests; the real one by default).
    """
    folder = Path(folder)
    report = inspect_checkpoint(folder)
    if not report["loads_compressed"]:
        raise KVSurgeryError(
            f"{folder} is not a complete kvsurgery checkpoint: {'; '.join(report['problems'])}"
        )
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    card = (folder / "README.md").read_text()
    card = card.replace("PATH_OR_REPO_ID", repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        # Upload a copy whose card names the repo in its loading snippet.
        staged = Path(tmp) / folder.name
        shutil.copytree(folder, staged)
        (staged / "README.md").write_text(card)
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(staged),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"Upload kvsurgery {report['method']} checkpoint",
        )
    return str(url)
