"""Baseline KV caches for `kvsurgery eval`, built the way ``build_cache(model)`` builds ours.

Each factory returns a *builder*: ``builder(model) -> transformers Cache``; a fresh cache
per sequence. :func:`cache_nbytes` measures what any of these caches has allocated.

- :func:`full`: the dense ``DynamicCache`` (the reference).
- :func:`sink_window`: StreamingLLM-style eviction (Xiao et al., "Efficient Streaming
  Language Models with Attention Sinks", arXiv 2309.17453): the first ``n_sink`` tokens and
  the most recent ``window`` tokens are kept exactly, everything between is dropped as soon
  as a forward step ends. Cached keys carry their original RoPE rotation, so dropping
  tokens needs no re-rotation (positions are not compacted).
- :func:`quantized`: transformers' own ``QuantizedCache`` (KIVI-style, per-channel groups,
  a dense residual window), with the ``quanto`` or ``hqq`` backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from .errors import KVSurgeryError

CacheBuilder = Callable[[object], Cache]
QUANT_BACKENDS = ("quanto", "hqq")


# -- measured memory ----------------------------------------------------------------------
def _leaf_tensors(obj) -> Iterator[torch.Tensor]:
    """Plain tensors inside ``obj``: tensors, tensor subclasses that flatten (quanto's
    packed/quantized tensors), and tuples/lists/dicts of them (HQQ's ``(W_q, meta)``)."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if type(obj) is not torch.Tensor and flatten is not None:
            names, _ = flatten()
            for n in names:
                yield from _leaf_tensors(getattr(obj, n))
        else:
            yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _leaf_tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _leaf_tensors(x)


def layer_nbytes(layer) -> int:
    """Bytes of storage a cache layer holds (measured, each storage counted once).

    A layer with its own ``nbytes()`` (KV-Dict, sink-window) answers itself. Otherwise the
    dense ``keys``/``values`` are counted, plus, for transformers' quantized layers, every
    tensor inside ``_quantized_keys``/``_quantized_values``: for quanto the packed integer
    data, scales and shifts of its ``WeightQBitsTensor``; for HQQ the packed ``W_q`` and the
    tensors of its meta dict (scale, zero). The dense residual window is in ``keys``/``values``.
    """
    own = getattr(layer, "nbytes", None)
    if callable(own):
        return int(own())
    if not getattr(layer, "is_initialized", False):
        return 0
    parts = [getattr(layer, "keys", None), getattr(layer, "values", None)]
    parts += [getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)]
    seen, total = set(), 0
    for t in _leaf_tensors(parts):
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes()) if st.data_ptr() else id(st)
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def cache_nbytes(cache) -> int:
    """Bytes a cache has allocated for keys and values (sum over its layers)."""
    if hasattr(cache, "layers"):
        return sum(layer_nbytes(layer) for layer in cache.layers)
    own = getattr(cache, "nbytes", None)
    if callable(own):
        return int(own())
    raise TypeError(f"cannot measure the memory of {type(cache).__name__}")


def _layer_types(model) -> list[str]:
    cfg = model.config.get_text_config(decoder=True)
    return list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)


# -- full ---------------------------------------------------------------------------------
def full() -> CacheBuilder:
    """The dense cache transformers uses by default."""

    def build(model) -> Cache:
        return DynamicCache(config=model.config)

    return build


# -- sink + window ------------------------------------------------------------------------
class SinkWindowLayer(CacheLayerMixin):
    """Exact first ``n_sink`` tokens + exact most recent ``window`` tokens; the rest dropped.

    State: ``keys``/``values`` ``(1, H_kv, <= n_sink + window, d)`` in position order
    ``[sinks | window]``. ``update`` returns everything it held plus the new tokens (so
    prefill attention is dense over the prompt) and prunes afterwards. The attention mask
    covers exactly what ``update`` returns: ``get_mask_sizes`` gives the held length plus
    the query and an offset that makes the held tokens sit right before the query, all
    visible, and the new tokens causal among themselves. Batch 1 only.
    """

    is_sliding = False
    is_croppable = False
    is_compileable = False
    supports_early_init = False

    def __init__(self, n_sink: int = 4, window: int = 1024):
        super().__init__()
        if n_sink < 0 or window < 1:
            raise KVSurgeryError(
                f"sink_window needs n_sink >= 0 and window >= 1, got {n_sink}, {window}"
            )
        self.n_sink, self.window = int(n_sink), int(window)
        self.seen = 0

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(*key_states.shape[:2], 0, key_states.shape[3])
        self.values = value_states.new_zeros(*value_states.shape[:2], 0, value_states.shape[3])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Take new tokens ``(1, H_kv, T, d)``; return held + new ``(1, H_kv, held + T, d)``."""
        if key_states.shape[0] != 1:
            raise KVSurgeryError(
                f"the sink_window baseline runs batch size 1 only, got {key_states.shape[0]}."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k = torch.cat([self.keys, key_states], dim=2)
        v = torch.cat([self.values, value_states], dim=2)
        self.seen += key_states.shape[2]
        if k.shape[2] > self.n_sink + self.window:
            # torch.cat copies: the pruned state owns exactly its bytes, not the big tensor's.
            ends = (slice(None, self.n_sink), slice(k.shape[2] - self.window, None))
            self.keys = torch.cat([k[:, :, s] for s in ends], dim=2)
            self.values = torch.cat([v[:, :, s] for s in ends], dim=2)
        else:
            self.keys, self.values = k, v
        return k, v

    def held(self) -> int:
        return self.keys.shape[2] if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.held()
        return held + query_length, self.seen - held

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0


class SinkWindowCache(Cache):
    """Sink + window on full-attention layers; sliding-window layers stay as transformers has them."""

    def __init__(self, layers):
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        return sum(layer_nbytes(layer) for layer in self.layers)


def _refuse_padding(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    mask = kwargs.get("attention_mask")
    if isinstance(cache, SinkWindowCache) and mask is not None:
        if mask.dim() != 2 or not bool(mask.all()):
            raise KVSurgeryError(
                "the sink_window baseline does not support padding or custom attention masks "
                "(its kept tokens do not line up with mask columns); run one unpadded sequence "
                "at a time."
            )


def sink_window(n_sink: int = 4, window: int = 1024) -> CacheBuilder:
    """StreamingLLM baseline: ``n_sink`` first + ``window`` most recent tokens, exact."""
    if n_sink < 0 or window < 1:
        raise KVSurgeryError(
            f"sink_window needs n_sink >= 0 and window >= 1, got {n_sink}, {window}"
        )

    def build(model) -> Cache:
        if not getattr(model, "_kvs_sink_guard", False):
            model.register_forward_pre_hook(_refuse_padding, with_kwargs=True)
            model._kvs_sink_guard = True
        cfg = model.config.get_text_config(decoder=True)
        layers = []
        for lt in _layer_types(model):
            if lt == "sliding_attention" and getattr(cfg, "sliding_window", None):
                layers.append(DynamicSlidingWindowLayer(sliding_window=cfg.sliding_window))
            else:
                layers.append(SinkWindowLayer(n_sink, window))
        return SinkWindowCache(layers)

    return build


# -- quantized ----------------------------------------------------------------------------
_AVAILABLE: dict[tuple[str, int], str | None] = {}


def quantized_unavailable(backend: str, nbits: int = 4) -> str | None:
    """``None`` if transformers' ``QuantizedCache`` runs here with ``backend``/``nbits``,
    otherwise the reason (import error, unsupported bit width, failing CPU kernel...).

    Checked once per process by quantizing and dequantizing a small random tensor.
    """
    if backend not in QUANT_BACKENDS:
        return f"unknown quantization backend {backend!r}; use one of {', '.join(QUANT_BACKENDS)}"
    key = (backend, int(nbits))
    if key not in _AVAILABLE:
        from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

        cls = QuantoQuantizedLayer if backend == "quanto" else HQQQuantizedLayer
        try:
            layer = cls(nbits=nbits, q_group_size=64, residual_length=1)
            k = torch.randn(1, 1, 8, 64)
            layer.update(k, k.clone())
            out, _ = layer.update(k[:, :, :1], k[:, :, :1].clone())
            if out.shape != (1, 1, 9, 64) or not torch.isfinite(out).all():
                raise RuntimeError(f"round trip returned {tuple(out.shape)} / non-finite values")
            _AVAILABLE[key] = None
        except Exception as e:  # any failure means: not usable on this machine
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _AVAILABLE[key] = f"{backend} int{nbits} unavailable: {type(e).__name__}: {msg[:200]}"
    return _AVAILABLE[key]


def quantized(
    nbits: int = 4, backend: str = "quanto", *, q_group_size: int = 64, residual_length: int = 128
) -> CacheBuilder:
    """transformers' ``QuantizedCache``: ``nbits`` integer K/V in groups of ``q_group_size``
    along the channel axis, the newest ``residual_length`` tokens dense."""
    reason = quantized_unavailable(backend, nbits)
    if reason:
        raise KVSurgeryError(reason)

    def build(model) -> Cache:
        from transformers import QuantizedCache

        try:
            return QuantizedCache(
                backend,
                model.config,
                nbits=nbits,
                q_group_size=q_group_size,
                residual_length=residual_length,
            )
        except ValueError as e:  # e.g. models with sliding-window layers
            raise KVSurgeryError(f"QuantizedCache({backend}) cannot serve this model: {e}") from e

    return build
