"""Route attention through compressed cache layers; install a method's state on a model.

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

from .kvs_methods import check_buffers, method_runtime

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
    softcap = kwargs.get("softcap")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if getattr(layer, "last_had_past", False) and hasattr(layer, "attend"):
        extra = {"softcap": softcap} if softcap else {}  # only layers that support it get it
        return layer.attend(query, attention_mask, scale, **extra), None
    if getattr(layer, "observe", None) is not None:  # layers that protect prompt tokens score them
        layer.observe(query, key, attention_mask, scale)
    if softcap:  # SDPA cannot softcap logits (Gemma2): plain attention instead
        return _dense_softcap(query, key, value, attention_mask, scaling, softcap), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, **kwargs
    )


def _dense_softcap(query, key, value, attention_mask, scaling, softcap):
    """Dense attention with logit softcapping; ``attention_mask`` as the sdpa mask function
    builds it (bool, True = attend) or None (causal). Returns ``(B, Q, H, d)``."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    g = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    w = (query.float() @ k.float().transpose(-1, -2)) * scaling
    w = softcap * torch.tanh(w / softcap)
    q_len, k_len = w.shape[-2], w.shape[-1]
    if attention_mask is None:
        q_pos = torch.arange(k_len - q_len, k_len, device=w.device)
        attention_mask = torch.arange(k_len, device=w.device)[None, :] <= q_pos[:, None]
    elif attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > -1  # additive masks: 0 = attend, -inf = masked
    else:
        attention_mask = attention_mask[..., :k_len]
    w = w.masked_fill(~attention_mask, float("-inf"))
    p = torch.softmax(w, dim=-1).nan_to_num(0.0)  # fully masked rows (padding) give zeros
    return (p @ v.float()).to(query.dtype).transpose(1, 2).contiguous()


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
    runtime = method_runtime(block.get("method"))
    layers = block.get("layers")
    if not isinstance(layers, list) or len(layers) != num_layers:
        raise ValueError(
            f"config.kvsurgery.layers must list {num_layers} layers (one per decoder layer), "
            f"found {len(layers) if isinstance(layers, list) else type(layers).__name__}."
        )
    for i, spec in enumerate(layers):
        if not isinstance(spec, dict):
            raise ValueError(f"config.kvsurgery.layers[{i}] must be a mapping, got {spec!r}.")
    runtime.validate(block, num_layers)


def install(model, block: dict, tensors: dict | None = None) -> None:
    """Give ``model`` the state of a compressed method: buffers, hooks, attention routing.

    ``block``: the ``kvsurgery`` config block (method, per-layer specs, global settings).
    ``tensors``: ``{layer: {buffer name: tensor}}`` to copy in (in-process use); without
    it the method's buffers are created as NaN placeholders for ``from_pretrained`` to fill.
    A model may be re-installed with another method (evaluation does so).
    """
    register()
    modules = attention_modules(model)
    validate_block(block, len(modules))
    runtime = method_runtime(block["method"])
    for i, mod in enumerate(modules):
        spec = block["layers"][i]
        if not spec.get("dense"):
            runtime.install_layer(mod, spec, block, None if tensors is None else tensors.get(i, {}))
        if not getattr(mod, "_kvs_hooked", False):
            mod.register_forward_pre_hook(_stash_cache, with_kwargs=True)
            mod._kvs_hooked = True
    model._kvsurgery_state = {**block, "modules": modules}
    if tensors is not None:
        prepare(model)


def install_kvdict(model, block: dict, dictionaries: dict) -> None:
    """:func:`install` for KV-Dict with ``{layer: (D_k (d, N_k), D_v (d, N_v))}``."""
    tensors = {i: {"kvsurgery_dk": dk, "kvsurgery_dv": dv} for i, (dk, dv) in dictionaries.items()}
    install(model, block, tensors)


def prepare(model) -> None:
    """After the buffers are (re)loaded: check them, then build each layer's derived state."""
    check_buffers(model)
    state = model._kvsurgery_state
    runtime = method_runtime(state["method"])
    for i, mod in enumerate(state["modules"]):
        spec = state["layers"][i]
        if not spec.get("dense"):
            runtime.prepare_layer(i, mod, spec, state)
