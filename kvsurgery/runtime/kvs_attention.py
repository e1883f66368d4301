"""Route attention through compressed cache layers; install KV-Dict state on a model.

The transformers attention function does not receive the cache, so a forward pre-hook on
every attention module keeps a reference to the ``past_key_values`` of the current call;
the registered ``"kvsurgery"`` attention function then asks that cache's layer to attend
over its compressed state. Layers that are not compressed (dense, sliding-window), and
prefill calls with no past, use SDPA on the tensors the cache returned.
This file is copied flat into exported checkpoints.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "kvsurgery"
FORMAT_VERSION = 1


def kvsurgery_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention function registered as ``"kvsurgery"``; same contract as SDPA's.

    query ``(B, H, Q, d)``; key/value: what the cache layer returned; returns
    ``(out (B, Q, H, d), None)``.
    """
    cache = getattr(module, "_kvs_cache", None)
    layer = None
    if cache is not None and module.layer_idx < len(getattr(cache, "layers", ())):
        layer = cache.layers[module.layer_idx]
    # Any compressed layer (KV-Dict, ClusterKV, ...) attends over its own state once it
    # holds a past; dense and sliding-window layers go to SDPA.
    if getattr(layer, "last_had_past", False) and hasattr(layer, "attend"):
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        return layer.attend(query, attention_mask, scaling), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, **kwargs
    )


def register() -> None:
    """Make ``attn_implementation="kvsurgery"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, kvsurgery_attention)
    # Without a mask function of its own the attention function would get no mask at all,
    # silently ignoring padding.
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _stash_cache(module, args, kwargs):
    module._kvs_cache = kwargs.get("past_key_values")


def attention_modules(model) -> list:
    """The self-attention module of every decoder layer, indexed by ``layer_idx``."""
    found = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if idx is not None and hasattr(m, "head_dim") and type(m).__name__.endswith("Attention"):
            found.setdefault(idx, m)
    return [found[i] for i in sorted(found)]


def validate_block(block: dict, num_layers: int) -> None:
    """Check a ``kvsurgery`` config block before anything is built from it."""
    if not isinstance(block, dict):
        raise ValueError(
            "config.kvsurgery must be a mapping; the checkpoint's config.json is damaged."
        )
    version = block.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"config.kvsurgery.format_version is {version!r} but this runtime reads version "
            f"{FORMAT_VERSION}; re-export the checkpoint with a matching kvsurgery."
        )
    if block.get("method") != "kvdict":
        raise ValueError(
            f"config.kvsurgery.method {block.get('method')!r} is not supported by this runtime."
        )
    layers = block.get("layers")
    if not isinstance(layers, list) or len(layers) != num_layers:
        raise ValueError(
            f"config.kvsurgery.layers must list {num_layers} layers (one per decoder layer), "
            f"found {len(layers) if isinstance(layers, list) else type(layers).__name__}."
        )
    for i, spec in enumerate(layers):
        if spec is None or spec.get("dense"):
            continue
        for key in ("s_k", "s_v", "n_atoms_k", "n_atoms_v"):
            if not isinstance(spec.get(key), int) or spec[key] < 1:
                raise ValueError(
                    f"config.kvsurgery.layers[{i}].{key} must be a positive int, got {spec.get(key)!r}."
                )
        if spec["s_k"] > spec["n_atoms_k"] or spec["s_v"] > spec["n_atoms_v"]:
            raise ValueError(f"config.kvsurgery.layers[{i}]: sparsity exceeds the number of atoms.")
    for key in ("sinks", "buffer", "flush"):
        if not isinstance(block.get(key), int) or block[key] < (1 if key != "sinks" else 0):
            raise ValueError(
                f"config.kvsurgery.{key} must be a non-negative int, got {block.get(key)!r}."
            )


def install_kvdict(model, block: dict, dictionaries: dict | None = None) -> None:
    """Give ``model`` KV-Dict state: fp32 dictionary buffers, hooks, attention routing.

    ``block``: the ``kvsurgery`` config block (method, per-layer s_k/s_v/atoms, sinks, buffer).
    ``dictionaries``: ``{layer: (D_k (d, N_k), D_v (d, N_v))}`` to copy in (in-process use);
    without it the buffers are created empty (NaN) for ``from_pretrained`` to fill.
    """
    register()
    modules = attention_modules(model)
    validate_block(block, len(modules))
    for i, mod in enumerate(modules):
        spec = block["layers"][i]
        if spec is None or spec.get("dense"):
            continue
        d = mod.head_dim
        dev = next(mod.parameters()).device
        if dictionaries is not None:
            dk, dv = (t.detach().to(dev, torch.float32).clone() for t in dictionaries[i])
        else:
            dk = torch.full((d, spec["n_atoms_k"]), float("nan"), device=dev)
            dv = torch.full((d, spec["n_atoms_v"]), float("nan"), device=dev)
        mod.register_buffer("kvsurgery_dk", dk, persistent=True)
        mod.register_buffer("kvsurgery_dv", dv, persistent=True)
        if not getattr(mod, "_kvs_hooked", False):
            mod.register_forward_pre_hook(_stash_cache, with_kwargs=True)
            mod._kvs_hooked = True
    model._kvsurgery_state = {**block, "modules": modules}
    refresh_grams(model)


def refresh_grams(model) -> None:
    """Cache ``DᵀD`` per layer (OMP needs it) after the dictionaries are (re)loaded."""
    for mod in model._kvsurgery_state["modules"]:
        if hasattr(mod, "kvsurgery_dk"):
            mod._kvs_gram_k = (mod.kvsurgery_dk.T @ mod.kvsurgery_dk).float()
            mod._kvs_gram_v = (mod.kvsurgery_dv.T @ mod.kvsurgery_dv).float()


def check_dictionaries(model) -> None:
    """Fail loudly if a dictionary is missing (NaN), not fp32, or not unit-norm."""
    for i, mod in enumerate(model._kvsurgery_state["modules"]):
        for name in ("kvsurgery_dk", "kvsurgery_dv"):
            if not hasattr(mod, name):
                continue
            t = getattr(mod, name)
            if t.dtype != torch.float32:
                raise ValueError(f"layer {i} {name} is {t.dtype}, expected float32.")
            if not torch.isfinite(t).all():
                raise ValueError(
                    f"layer {i} {name} was not loaded (missing from the checkpoint's weights); "
                    "the checkpoint is incomplete: re-export it with `kvsurgery export`."
                )
            norms = t.norm(dim=0)
            if (norms - 1).abs().max() > 1e-3:
                raise ValueError(
                    f"layer {i} {name} atoms are not unit-norm (max deviation "
                    f"{float((norms - 1).abs().max()):.3g}); the checkpoint's weights are damaged."
                )
