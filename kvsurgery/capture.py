"""Capture post-RoPE keys, values (and queries) per layer, as attention hands them to the cache.

Keys and values are taken at ``past_key_values.update(k, v, layer_idx)`` — the exact tensors
every compressed cache layer will receive — by a cache that records and stores nothing.
Queries are taken at the attention function (the only place a model exposes them) by a
thin wrapper around the model's own attention implementation.

Per layer a bounded reservoir (see :mod:`kvsurgery.reservoir`) keeps at most
``max_vectors`` rows; its state is checkpointed to ``capture/layer_XXX.safetensors`` so an
interrupted run resumes where it stopped and ends with the same vectors.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import DynamicCache

from .errors import KVSurgeryError
from .reservoir import Reservoir, step_generator

CAPTURE_DIR = "capture"
_ATTN_NAME = "kvsurgery_capture"


class RecordingCache(DynamicCache):
    """A ``DynamicCache`` that shows every ``update`` to ``record(layer_idx, k, v)``.

    It stores nothing and returns the incoming tensors, which is what a fresh dynamic
    cache returns on the first forward: use one instance per (single) forward pass.
    """

    def __init__(self, config, record):
        super().__init__(config=config)
        self.record = record
        self.seen_layers: set[int] = set()
        self.seen_shapes: dict[int, tuple] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.seen_layers.add(layer_idx)
        self.seen_shapes[layer_idx] = tuple(key_states.shape)
        self.record(layer_idx, key_states, value_states)
        return key_states, value_states


_query_sink = None  # set while a capture runs: callable(layer_idx, query)


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    if _query_sink is not None:
        _query_sink(module.layer_idx, query)
    inner = getattr(module.config, "_kvsurgery_inner_attn", "sdpa")
    fn = eager_attention_forward if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
    return fn(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def recording_queries(model, sink):
    """Route the model's attention through a wrapper that shows queries to ``sink``."""
    global _query_sink
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    inner = model.config._attn_implementation or "sdpa"
    AttentionInterface.register(_ATTN_NAME, _recording_attention)
    AttentionMaskInterface.register(
        _ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS[inner if inner in ("sdpa", "eager") else "sdpa"]
    )
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    for c in configs:
        c._kvsurgery_inner_attn = inner
    model.set_attn_implementation(_ATTN_NAME)
    _query_sink = sink
    try:
        yield
    finally:
        _query_sink = None
        model.set_attn_implementation(inner)


def _layer_file(out: Path, idx: int) -> Path:
    return out / CAPTURE_DIR / f"layer_{idx:03d}.safetensors"


def _rows(x: torch.Tensor, t_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, H, T, d)`` -> rows ``(B*H*T, d)`` with their head and position."""
    b, h, t, d = x.shape
    rows = x.detach().to("cpu", torch.float32).reshape(b * h * t, d)
    heads = torch.arange(h, dtype=torch.int16).view(1, h, 1).expand(b, h, t).reshape(-1)
    pos = (torch.arange(t, dtype=torch.int32) + t_offset).view(1, 1, t).expand(b, h, t).reshape(-1)
    return rows, heads, pos


def capture_kv(
    model,
    windows: torch.Tensor,
    out_dir: str | Path,
    *,
    max_vectors: int,
    seed: int,
    capture_queries: bool = True,
    fingerprint: str = "",
    checkpoint_seconds: float = 30.0,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Run ``windows`` ``(n_samples, seq_len)`` through ``model`` and fill per-layer reservoirs.

    Keys/values of a token and KV head are sampled together (a row of ``keys`` and the same
    row of ``values`` belong to one token). Writes ``capture/layer_XXX.safetensors`` with
    ``keys``/``values`` ``(V, d)`` float32, ``heads`` int16, ``positions`` and ``samples``
    (window index) int32 (and ``q_*`` for queries) plus ``capture/progress.json``. ``fingerprint`` identifies the
    model+data+settings: a resume with another fingerprint is refused. ``stop_after`` stops
    after that many samples (as an interruption would; used by tests).
    Returns the progress record.
    """
    out = Path(out_dir)
    (out / CAPTURE_DIR).mkdir(parents=True, exist_ok=True)
    prog_path = out / CAPTURE_DIR / "progress.json"
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    n_samples = windows.shape[0]

    kv_res = [Reservoir(max_vectors) for _ in range(n_layers)]
    q_res = [Reservoir(max_vectors) for _ in range(n_layers)]
    done = 0
    if prog_path.is_file():
        prog = json.loads(prog_path.read_text())
        if prog.get("fingerprint") != fingerprint:
            raise KVSurgeryError(
                f"{out} holds a capture of another model, data, settings or kvsurgery "
                "capture format "
                f"({prog.get('fingerprint')} vs {fingerprint}); use a new --out folder or "
                "delete that one."
            )
        done = prog["samples_done"]
        for i in range(n_layers):
            state = load_file(_layer_file(out, i))
            kv_res[i] = Reservoir.from_state(max_vectors, state, "kv_")
            if capture_queries:
                q_res[i] = Reservoir.from_state(max_vectors, state, "q_")

    def save(samples_done: int, complete: bool) -> dict:
        for i in range(n_layers):
            state = {**kv_res[i].state("kv_"), **(q_res[i].state("q_") if capture_queries else {})}
            path = _layer_file(out, i)
            tmp = path.with_suffix(".tmp")
            save_file(state, tmp)
            os.replace(tmp, path)
        record = {
            "fingerprint": fingerprint,
            "samples_done": samples_done,
            "samples_total": n_samples,
            "complete": complete,
            "num_layers": n_layers,
            "max_vectors": max_vectors,
        }
        tmp = prog_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, prog_path)
        return record

    if done >= n_samples:
        return json.loads(prog_path.read_text())

    device = next(model.parameters()).device
    pending_q: dict[int, torch.Tensor] = {}
    sample_idx = done

    def record_kv(layer_idx, k, v):
        kr, heads, pos = _rows(k)
        vr, _, _ = _rows(v)
        gen = step_generator(seed, "kv", layer_idx, sample_idx)
        rows = {"keys": kr, "values": vr, "heads": heads, "positions": pos}
        # the window a row came from: methods that replay attention (ClusterKV) regroup by it
        rows["samples"] = torch.full_like(pos, sample_idx)
        kv_res[layer_idx].add(rows, gen)

    def record_q(layer_idx, q):
        pending_q[layer_idx] = q

    last_save = time.monotonic()
    ctx = recording_queries(model, record_q) if capture_queries else contextlib.nullcontext()
    bar = tqdm(total=n_samples, initial=done, desc="capture", unit="sample", disable=not progress)
    record = None
    with ctx, torch.no_grad():
        for sample_idx in range(done, n_samples):
            cache = RecordingCache(model.config, record_kv)
            ids = windows[sample_idx : sample_idx + 1].to(device)
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            missing = set(range(n_layers)) - cache.seen_layers
            if missing:
                raise KVSurgeryError(
                    f"layers {sorted(missing)[:8]} never called past_key_values.update(); this "
                    "model's attention does not use the transformers cache API."
                )
            for layer_idx, q in pending_q.items():
                qr, heads, pos = _rows(q)
                gen = step_generator(seed, "q", layer_idx, sample_idx)
                rows = {"queries": qr, "heads": heads, "positions": pos}
                rows["samples"] = torch.full_like(pos, sample_idx)
                q_res[layer_idx].add(rows, gen)
            pending_q.clear()
            bar.update(1)
            finished = sample_idx + 1
            if stop_after is not None and finished >= stop_after and finished < n_samples:
                record = save(finished, False)
                bar.close()
                return record
            if time.monotonic() - last_save > checkpoint_seconds:
                save(finished, False)
                last_save = time.monotonic()
    bar.close()
    return save(n_samples, True)


def load_layer(calib_dir: str | Path, idx: int) -> dict[str, torch.Tensor]:
    """Captured tensors of one layer: ``keys``, ``values``, ``heads``, ``positions``, ``queries``..."""
    state = load_file(_layer_file(Path(calib_dir), idx))
    out = {k[3:]: v for k, v in state.items() if k.startswith("kv_")}
    out.update(
        {("queries" if k == "q_queries" else k): v for k, v in state.items() if k.startswith("q_")}
    )
    return out
