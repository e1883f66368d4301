"""The compressed-cache methods this runtime knows, and the one way each is installed on a
model and turned into cache layers. Copied flat into exported checkpoints.

A method's runtime module provides:

- ``BUFFERS``: names of the persistent fp32 buffers it adds to each compressed attention
  module (saved with the weights; may be empty); optionally ``OPTIONAL_BUFFERS``, added only
  under some settings, and ``buffer_names(block)``, the ones a given block needs;
- ``validate(block, num_layers)``: check its settings in ``config.kvsurgery`` (raise
  ``ValueError`` naming the key); the common keys are checked before;
- ``install_layer(mod, spec, block, tensors)``: register ``BUFFERS`` on one attention module,
  from ``tensors`` (``{name: tensor}``, in-process use) or as NaN placeholders that
  ``from_pretrained`` fills;
- ``prepare_layer(i, mod, spec, block)``: after the buffers are (re)loaded: derived state and
  sanity checks (raise ``ValueError``);
- ``make_layer(mod, spec, block)``: a fresh cache layer for one decoder layer.

``block["layers"][i]`` is that method's per-layer spec, or ``{"dense": True}`` for a layer
kept uncompressed. Sliding-window layers always keep transformers' own layer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from . import kvs_cache, kvs_clusterkv, kvs_subgen
from .kvs_layer import link_prompt_scores

METHODS = {"kvdict": kvs_cache, "clusterkv": kvs_clusterkv, "subgen": kvs_subgen}


def method_runtime(name):
    if name not in METHODS:
        raise ValueError(
            f"config.kvsurgery.method {name!r} is not supported by this runtime "
            f"(it knows {', '.join(sorted(METHODS))}); re-export with a matching kvsurgery."
        )
    return METHODS[name]


def all_buffers() -> list[str]:
    return sorted(
        {b for m in METHODS.values() for b in (*m.BUFFERS, *getattr(m, "OPTIONAL_BUFFERS", ()))}
    )


def buffer_names(block: dict) -> tuple[str, ...]:
    """The buffers every compressed layer of ``block`` must carry."""
    runtime = method_runtime(block.get("method"))
    return runtime.buffer_names(block) if hasattr(runtime, "buffer_names") else runtime.BUFFERS


class KVSurgeryCache(Cache):
    """A cache whose layers are given (compressed or dense); built by :func:`build_cache`."""

    def __init__(self, layers):
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes allocated by every layer (tensor storages, measured)."""
        total = 0
        for layer in self.layers:
            if hasattr(layer, "nbytes"):  # compressed layers measure their own storage
                total += layer.nbytes()
            elif getattr(layer, "is_initialized", False) and layer.keys is not None:
                total += (
                    layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
                )
        return total


def build_cache(model) -> KVSurgeryCache:
    """A fresh compressed cache for a model prepared by ``kvs_attention.install``."""
    state = model._kvsurgery_state
    runtime = method_runtime(state["method"])
    cfg = model.config.get_text_config(decoder=True)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    layers = []
    for i, lt in enumerate(layer_types):
        spec = state["layers"][i]
        if lt == "sliding_attention" and getattr(cfg, "sliding_window", None):
            layers.append(DynamicSlidingWindowLayer(sliding_window=cfg.sliding_window))
        elif spec.get("dense"):
            layers.append(DynamicLayer())
        else:
            layers.append(runtime.make_layer(state["modules"][i], spec, state))
    link_prompt_scores(layers)  # layers that protect tokens share the prompt's scores
    return KVSurgeryCache(layers)


def check_buffers(model) -> None:
    """Every method buffer is fp32 and finite (a damaged or partial load fails here)."""
    for i, mod in enumerate(model._kvsurgery_state["modules"]):
        for name in all_buffers():
            t = getattr(mod, name, None)
            if t is None:
                continue
            if t.dtype != torch.float32:
                raise ValueError(f"layer {i} {name} is {t.dtype}, expected float32.")
            if not torch.isfinite(t).all():
                raise ValueError(
                    f"layer {i} {name} was not loaded (missing from the checkpoint's weights); "
                    "the checkpoint is incomplete: re-export it with `kvsurgery export`."
                )
