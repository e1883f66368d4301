"""`kvsurgery calibrate`: capture K/V on sample text, report, and run method calibrators.

The calibration folder::

    manifest.json             versioned: model, data, settings, recipes, versions, results
    capture/layer_XXX.safetensors   per-layer reservoirs (keys, values, queries, ...)
    capture/progress.json     resume state
    report.json, report.md    per-layer K/V statistics (+ method results)
    <method>/...              what each method calibrator adds (e.g. kvdict/dictionaries.safetensors)
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import time
from pathlib import Path

from . import FORMAT_VERSION, __version__
from .capture import capture_kv, load_layer
from .data import DatasetSpec, check_seq_len, iter_texts, pack_tokens, tokens_digest
from .errors import KVSurgeryError
from .models import load_model, model_dims
from .recipes import CalibrationConfig, Recipe
from .report import layer_report, report_table

MANIFEST = "manifest.json"


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "kvsurgery": __version__}
    for name in (
        "torch",
        "transformers",
        "accelerate",
        "safetensors",
        "datasets",
        "triton",
        "gguf",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_manifest(calib_dir: str | Path) -> dict:
    path = Path(calib_dir) / MANIFEST
    if not path.is_file():
        raise KVSurgeryError(
            f"{calib_dir} is not a calibration folder (no {MANIFEST}); create one with "
            "`kvsurgery calibrate --out DIR`."
        )
    man = json.loads(path.read_text())
    version = man.get("format_version")
    if version != FORMAT_VERSION:
        raise KVSurgeryError(
            f"{calib_dir} was written with calibration format {version}, this kvsurgery reads "
            f"format {FORMAT_VERSION}; re-run `kvsurgery calibrate` with this version."
        )
    return man


# Each method's calibrator module provides ``calibrate(calib_dir, recipe, dims, progress)``
# (returns ``{"manifest": entry, "report": ...}``), ``runtime_block(entry)`` (the method
# part of the exported config block) and ``load_tensors(calib_dir, entry)`` (``{layer:
# {buffer name: tensor}}``, the learned tensors the runtime's buffers hold).
# Version of the capture files: a capture written by another format (e.g. before rows
# recorded their window) is refused on resume instead of failing half-way.
CAPTURE_FORMAT = 2

CALIBRATORS = {
    "kvdict": "kvdict_calibrate",
    "clusterkv": "clusterkv_calibrate",
    "subgen": "subgen_calibrate",
}


def method_module(method: str):
    if method not in CALIBRATORS:
        raise KVSurgeryError(
            f"no calibrator for method {method!r}; known methods: {', '.join(sorted(CALIBRATORS))}."
        )
    return importlib.import_module(f"{__package__}.{CALIBRATORS[method]}")


def _calibrator(method: str):
    return method_module(method).calibrate


def calibrate(
    model: str | None,
    out_dir: str | Path,
    *,
    recipes: list[Recipe] = (),
    dataset: DatasetSpec | None = None,
    settings: CalibrationConfig | None = None,
    dtype: str = "auto",
    device_map: str | None = None,
    loaded=None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Run a calibration and return its manifest.

    ``loaded``: an already loaded ``(model, tokenizer, ModelInfo)`` (tests, notebooks);
    otherwise ``model`` is loaded with :func:`kvsurgery.models.load_model`.
    ``stop_after``: stop the capture after that many samples, as an interruption would.
    """
    settings = settings or CalibrationConfig()
    dataset = dataset or DatasetSpec()
    out = Path(out_dir)
    methods = [r.method for r in recipes]
    if len(set(methods)) != len(methods):
        raise KVSurgeryError(f"two recipes for the same method in {methods}; give one per method.")
    calibrators = {m: _calibrator(m) for m in methods}
    for m in methods:  # methods that replay attention need the queries
        if getattr(method_module(m), "NEEDS_QUERIES", False) and not settings.capture_queries:
            raise KVSurgeryError(
                f"the {m} calibration needs captured queries; drop capture_queries: false."
            )
    out.mkdir(parents=True, exist_ok=True)

    hf_model, tok, info = (
        loaded if loaded is not None else load_model(model, dtype=dtype, device_map=device_map)
    )
    check_seq_len(settings.seq_len, hf_model.config)
    windows = pack_tokens(iter_texts(dataset), tok, settings.samples, settings.seq_len)
    dims = model_dims(hf_model.config)
    data_record = {
        **dataset.to_dict(),
        "samples": settings.samples,
        "seq_len": settings.seq_len,
        "tokens_digest": tokens_digest(windows),
    }
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                info.revision,
                data_record,
                settings.max_vectors,
                settings.seed,
                settings.capture_queries,
                CAPTURE_FORMAT,
            ],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]

    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": info.to_dict(),
        "dims": dims,
        "data": data_record,
        "settings": {
            "max_vectors": settings.max_vectors,
            "seed": settings.seed,
            "capture_queries": settings.capture_queries,
        },
        "recipes": {r.method: r.to_dict() for r in recipes},
        "versions": library_versions(),
        "capture": {"complete": False},
        "methods": {},
    }
    old = out / MANIFEST
    if old.is_file():  # resuming: keep method results already computed for other recipes
        prev = json.loads(old.read_text())
        manifest["methods"] = {k: v for k, v in prev.get("methods", {}).items() if k not in methods}
    write_json_atomic(out / MANIFEST, manifest)

    t0 = time.perf_counter()
    prog = capture_kv(
        hf_model,
        windows,
        out,
        max_vectors=settings.max_vectors,
        seed=settings.seed,
        capture_queries=settings.capture_queries,
        fingerprint=fingerprint,
        stop_after=stop_after,
        progress=progress,
    )
    manifest["capture"] = {**prog, "seconds": round(time.perf_counter() - t0, 2)}
    if not prog["complete"]:
        write_json_atomic(out / MANIFEST, manifest)
        return manifest

    layers = [
        layer_report(L["keys"], L["values"], L["heads"], seed=settings.seed)
        for L in (load_layer(out, i) for i in range(dims["num_layers"]))
    ]
    report = {"layers": layers}
    for recipe in recipes:
        result = calibrators[recipe.method](out, recipe, dims, progress=progress)
        manifest["methods"][recipe.method] = result["manifest"]
        report[recipe.method] = result["report"]
    write_json_atomic(out / "report.json", report)
    extra = {}
    for method, rep in report.items():
        if method != "layers" and isinstance(rep, dict) and "columns" in rep:
            extra.update(rep["columns"])
    (out / "report.md").write_text(f"# KV report: {info.source}\n\n{report_table(layers, extra)}\n")
    write_json_atomic(out / MANIFEST, manifest)
    return manifest
