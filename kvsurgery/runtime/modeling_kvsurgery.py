"""Remote code of a kvsurgery checkpoint: the base model class plus a compressed KV cache.

Loaded by ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``; needs only
torch and transformers (and triton on a GPU for the fast kernels). Compression is on by
default; ``attn_implementation="sdpa"`` (or passing your own ``past_key_values``) turns it
off. ``model.kvsurgery_cache()`` gives a fresh compressed cache for manual use.
"""

from __future__ import annotations

import re

import transformers

# Every helper is imported here directly: remote-code loading copies only the files the
# modeling file itself names (older transformers miss transitive imports).
from ..kernels.clusterkv import sparse_attention  # noqa: F401
from ..kernels.kvdict_attention import kvdict_attention  # noqa: F401
from ..kernels.omp import omp  # noqa: F401
from ..kernels.subgen import estimate_attention  # noqa: F401
from .kvs_attention import ATTN_NAME, install, prepare
from .kvs_cache import KVDictLayer  # noqa: F401
from .kvs_clusterkv import ClusterKVLayer  # noqa: F401
from .kvs_layer import CompressedLayer  # noqa: F401
from .kvs_methods import all_buffers, build_cache
from .kvs_subgen import SubGenLayer  # noqa: F401

# Written by `kvsurgery export`: the transformers class this checkpoint was exported from.
BASE_CLASS = "LlamaForCausalLM"
_Base = getattr(transformers, BASE_CLASS)


class KVSurgeryForCausalLM(_Base):
    # Learned tensors (dictionaries, ...) keep full precision whatever dtype the model is
    # loaded in.
    _keep_in_fp32_modules_strict = all_buffers()

    def __init__(self, config, *args, **kwargs):
        # None here means the user asked for no attention implementation: compress. An
        # explicit one (e.g. "sdpa", set on the config by from_pretrained) is respected.
        requested = getattr(config, "_attn_implementation_internal", None)
        super().__init__(config, *args, **kwargs)
        block = getattr(config, "kvsurgery", None)
        if block is None:
            raise ValueError(
                "config.json has no `kvsurgery` block: this is not a kvsurgery checkpoint; "
                "load it with its base class instead."
            )
        install(self, block)
        if requested is None:
            config._attn_implementation_internal = ATTN_NAME

    @property
    def kvsurgery_enabled(self) -> bool:
        return self.config._attn_implementation == ATTN_NAME

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as e:
            if "mismatched" not in str(e):
                raise
            raise ValueError(
                "the checkpoint's weights do not match its config.json: a tensor has another "
                "shape (see the load report above; for kvsurgery_dk/dv the per-layer "
                "n_atoms_k/n_atoms_v of config.kvsurgery). The config or the weights were "
                "altered: re-export the checkpoint."
            ) from e
        missing = sorted(k for k in info.get("missing_keys", ()) if "kvsurgery_" in k)
        if missing:
            where = re.search(r"layers\.(\d+)\..*(kvsurgery_\w+)", missing[0])
            what = f"layer {where[1]} {where[2]}" if where else missing[0]
            raise ValueError(
                f"{what} was not loaded (missing from the checkpoint's weights"
                + (f", with {len(missing) - 1} more" if len(missing) > 1 else "")
                + "); the checkpoint is incomplete: re-export it with `kvsurgery export`."
            )
        prepare(model)
        return (model, info) if want_info else model

    def kvsurgery_cache(self):
        """A fresh compressed cache (``generate(past_key_values=model.kvsurgery_cache())``)."""
        return build_cache(self)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if (
            self.kvsurgery_enabled
            and model_kwargs.get("past_key_values") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
        ):
            model_kwargs["past_key_values"] = build_cache(self)
            return
        return super()._prepare_cache_for_generation(
            generation_config, model_kwargs, *args, **kwargs
        )

    def forward(self, *args, past_key_values=None, use_cache=None, **kwargs):
        use = use_cache if use_cache is not None else self.config.use_cache
        if past_key_values is None and use and self.kvsurgery_enabled:
            past_key_values = build_cache(self)
        return super().forward(
            *args, past_key_values=past_key_values, use_cache=use_cache, **kwargs
        )
