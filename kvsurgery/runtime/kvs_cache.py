"""KV-Dict cache layer: exact sinks + sparse codes + an exact recent buffer.

Paper: "KV-Dict / Lexico: Sparse KV Cache Compression with Universal Dictionaries"
(arXiv 2412.08890). This file is copied flat into exported checkpoints: it imports only
torch, transformers and its sibling modules.

Token order inside a layer is the order of positions: ``[sinks | compressed | buffer]``,
so column ``j`` of the attention mask is token ``j`` of the layer for every batch row.

With ``protect > 0`` (beyond the paper; see ``kvs_layer.py``) the prompt is encoded at the
first step after the prefill, when every layer has scored it, and the ``protect``
best-scored tokens of each sequence among those encoded are also kept exact
(``kept_k/kept_v``, positions in ``kept_pos``): attention reads them exactly and masks
their codes. With ``protect_dtype="int8"`` they are stored as int8 with one scale per
token and kv head (model dtype), about half the bytes of exact ones, and read back
dequantized (relative error about 1%, against 20-40% for the codes); with ``"int4"`` as
4-bit codes with a step and a minimum per group of 32 channels, 31% of the bytes of exact
ones at d = 64 or 128 (relative error about 7%): about 1.7 tokens for the bytes of one int8.
"""

from __future__ import annotations

import torch

from ..kernels.kvdict_attention import kvdict_attention
from ..kernels.omp import omp
from .kvs_layer import PROTECT_SETTINGS, CompressedLayer

# Codes are stored in blocks of this many tokens: one reallocation per block keeps appends
# amortised O(1) while the allocated bytes stay within one block of what the format promises.
CODE_BLOCK = 256
_COEF_DTYPES = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float16": torch.float16,
    "float32": torch.float32,
}
_FP8_MAX = 448.0
# how protected tokens are stored: as given, int8 (one scale per vector) or packed int4
PROTECT_DTYPES = ("model", "int8", "int4")
INT4_GROUP = 32  # channels sharing one int4 step and minimum (fewer where head_dim needs)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(..., d)`` as int8 with one absmax scale per vector, kept in ``x``'s dtype
    (the int8 values are rounded against that stored scale, so ``q * scale`` is what was
    meant)."""
    scale = (x.float().abs().amax(-1, keepdim=True) / 127.0).to(x.dtype)
    q = (x.float() / scale.float().clamp_min(1e-30)).round().clamp(-127, 127)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float() * scale.float()).to(scale.dtype)


def int4_group(d: int) -> int:
    """Channels per int4 group for head dim ``d``: the largest power of two up to
    :data:`INT4_GROUP` that divides it (two codes share a byte, so ``d`` must be even)."""
    if d % 2:
        raise ValueError(
            f"protect_dtype int4 packs two channels per byte and needs an even head_dim, got "
            f"{d}; use protect_dtype int8 for this model"
        )
    g = INT4_GROUP
    while d % g:
        g //= 2
    return g


def quantize_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(..., d)`` as 4-bit codes, asymmetric per group of :func:`int4_group` channels.

    Returns ``packed`` uint8 ``(..., d / 2)`` (channel ``2i`` in the low nibble of byte
    ``i``, ``2i + 1`` in the high one) and ``params`` ``(..., 2 * d / group)`` in ``x``'s
    dtype: per group its step and its minimum, interleaved. Codes are rounded against the
    stored (rounded) step and minimum, so ``code * step + minimum`` is what was meant.
    """
    d = x.shape[-1]
    g = int4_group(d)
    y = x.float().reshape(*x.shape[:-1], d // g, g)
    lo = y.amin(-1, keepdim=True).to(x.dtype)
    step = ((y.amax(-1, keepdim=True) - lo.float()) / 15.0).to(x.dtype)
    q = ((y - lo.float()) / step.float().clamp_min(1e-30)).round().clamp(0, 15)
    q = q.to(torch.uint8).reshape(*x.shape[:-1], d)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, torch.cat([step, lo], -1).reshape(*x.shape[:-1], 2 * (d // g))


def dequantize_int4(packed: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_int4`: ``(..., d)`` in ``params``' dtype."""
    lead, n_groups = packed.shape[:-1], params.shape[-1] // 2
    q = torch.stack([packed & 15, packed >> 4], -1).reshape(*lead, n_groups, -1)
    p = params.float().reshape(*lead, n_groups, 2)
    return (q.float() * p[..., :1] + p[..., 1:]).reshape(*lead, -1).to(params.dtype)


_QUANTIZERS = {
    "int8": (quantize_int8, dequantize_int8),
    "int4": (quantize_int4, dequantize_int4),
}


class KVDictLayer(CompressedLayer):
    """One layer of a KV-Dict cache.

    State (allocated on first ``update``):
      sink_k/sink_v ``(B, H_kv, <=sinks, d)`` exact, model dtype;
      k_idx/v_idx ``(B, H_kv, capacity, s_k|s_v)`` int16 atom indices;
      k_coef/v_coef same shapes, 8-bit float (e4m3) coefficients;
      buf_k/buf_v ``(B, H_kv, n_buf, d)`` exact recent tokens, ``buffer <= n_buf < buffer + flush``
      between steps. A token is encoded once, when it leaves the buffer;
      kept_k/kept_v ``(B, H_kv, P, d)`` protected tokens (model dtype; int8 with scales
      kept_ks/kept_vs ``(B, H_kv, P, 1)``; or packed int4 ``(B, H_kv, P, d / 2)`` with steps
      and minima kept_ks/kept_vs ``(B, H_kv, P, 2 d / group)``), their positions kept_pos
      ``(B, P)``.

    With a key map ``kmap`` ``(H_kv, d, d)`` (calibrated ``query_weighting``), every key is
    stored as ``k W`` (sinks and buffer too, so one query serves both) and queries are read
    as ``q W⁻ᵀ``: scores are unchanged, and OMP codes keys in their queries' metric.
    """

    def __init__(
        self,
        dk,
        dv,
        gram_k,
        gram_v,
        s_k,
        s_v,
        *,
        sinks=4,
        buffer=128,
        flush=16,
        omp_tol=None,
        coef_dtype="float8_e4m3fn",
        kmap=None,
        qmap=None,
        protect=0,
        protect_window=32,
        protect_pool=9,
        protect_dtype="model",
    ):
        super().__init__()
        self.dk, self.dv, self.gram_k, self.gram_v = dk, dv, gram_k, gram_v
        self.kmap, self.qmap = kmap, qmap  # fp32 W and W⁻ᵀ, (H_kv, d[, d]), or both None
        self.s_k, self.s_v = int(s_k), int(s_v)
        self.sinks, self.buffer, self.flush = int(sinks), int(buffer), int(flush)
        self._set_protect(protect, protect_window, protect_pool)
        if protect_dtype not in PROTECT_DTYPES:
            raise ValueError(
                f"KVDictLayer protect_dtype must be one of {PROTECT_DTYPES}, got {protect_dtype!r}"
            )
        self.protect_dtype = protect_dtype
        self.omp_tol = omp_tol
        self.coef_dtype = _COEF_DTYPES[coef_dtype]
        self.n_comp = 0
        self.seen = 0
        self.last_had_past = False

    # -- allocation -------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states.new_zeros(b, h, 0, d)
        self.sink_k, self.sink_v = empty, empty.clone()
        self.buf_k, self.buf_v = empty.clone(), empty.clone()
        self.k_idx = torch.zeros(b, h, 0, self.s_k, dtype=torch.int16, device=self.device)
        self.v_idx = torch.zeros(b, h, 0, self.s_v, dtype=torch.int16, device=self.device)
        self.k_coef = torch.zeros(b, h, 0, self.s_k, dtype=self.coef_dtype, device=self.device)
        self.v_coef = torch.zeros(b, h, 0, self.s_v, dtype=self.coef_dtype, device=self.device)
        self.kept_k, self.kept_v = empty.clone(), empty.clone()
        self.kept_ks, self.kept_vs = empty[..., :1].clone(), empty[..., :1].clone()
        self._store_kept()  # empty tensors of the stored dtypes and widths
        self.kept_pos = torch.zeros(b, 0, dtype=torch.int64, device=self.device)
        self._chosen = False  # protected tokens picked (once per sequence)
        self.keys = self.values = None  # dense views do not exist for this layer
        self.is_initialized = True

    def _reserve(self, n_more: int) -> None:
        need = self.n_comp + n_more
        cap = self.k_idx.shape[2]
        if need <= cap:
            return
        new_cap = -(-need // CODE_BLOCK) * CODE_BLOCK

        def grow(t):
            out = t.new_zeros(*t.shape[:2], new_cap, t.shape[3])
            out[:, :, : self.n_comp] = t[:, :, : self.n_comp]
            return out

        self.k_idx, self.v_idx = grow(self.k_idx), grow(self.v_idx)
        self.k_coef, self.v_coef = grow(self.k_coef), grow(self.v_coef)

    # -- key map ----------------------------------------------------------------------
    # A map is ``(H_kv, d, d)``, or ``(H_kv, d)`` when it is diagonal (what calibration
    # writes: one scale per rotary pair), read as an elementwise scale: one multiply per
    # decode step instead of a batched matrix product.
    def _map_keys(self, k):
        if self.kmap is None:
            return k
        if self.kmap.dim() == 2:
            return (k.float() * self.kmap[:, None, :]).to(k.dtype)
        return torch.einsum("bhtd,hde->bhte", k.float(), self.kmap).to(k.dtype)

    def _map_query(self, q):
        if self.qmap is None:
            return q
        b, n_heads, q_len, d = q.shape
        g = q.reshape(b, self.qmap.shape[0], n_heads // self.qmap.shape[0], q_len, d)
        if self.qmap.dim() == 2:
            out = g.float() * self.qmap[:, None, None, :]
        else:
            out = torch.einsum("bhgqd,hde->bhgqe", g.float(), self.qmap)
        return out.to(q.dtype).reshape(b, n_heads, q_len, d)

    # -- encoding ---------------------------------------------------------------------
    def _encode(self, x, D, gram, s):
        b, h, t, d = x.shape
        idx, coef = omp(x.reshape(-1, d).float(), D, s, gram=gram, tol=self.omp_tol)
        if self.coef_dtype == torch.float8_e4m3fn:
            coef = coef.clamp(-_FP8_MAX, _FP8_MAX)
        return (
            idx.to(torch.int16).view(b, h, t, s),
            coef.to(self.coef_dtype).view(b, h, t, s),
        )

    def _append_codes(self, k, v):
        t = k.shape[2]
        if t == 0:
            return
        self._reserve(t)
        ki, kc = self._encode(k, self.dk, self.gram_k, self.s_k)
        vi, vc = self._encode(v, self.dv, self.gram_v, self.s_v)
        sl = slice(self.n_comp, self.n_comp + t)
        self.k_idx[:, :, sl], self.k_coef[:, :, sl] = ki, kc
        self.v_idx[:, :, sl], self.v_coef[:, :, sl] = vi, vc
        self.n_comp += t

    # -- cache verbs ------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        """Store new tokens ``(B, H_kv, T, d)``; returns them unchanged (prefill attention is dense)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.last_had_past = self.seen > 0
        self.seen += key_states.shape[2]
        # the stored state is not differentiable (codes come from OMP): keep no graph
        k, v = self._take_sinks(self._map_keys(key_states.detach()), value_states.detach())
        self.buf_k = torch.cat([self.buf_k, k], dim=2)
        self.buf_v = torch.cat([self.buf_v, v], dim=2)
        if self.protect > 0 and not self._chosen:
            # the prompt waits in the buffer until every layer has scored it (the prefill's
            # attention runs after this update): the next attend encodes it
            return key_states, value_states
        n_buf = self.buf_k.shape[2]
        if n_buf >= self.buffer + self.flush or (not self.last_had_past and n_buf > self.buffer):
            self._flush(n_buf - self.buffer)
        return key_states, value_states

    def _flush(self, n: int) -> None:
        """Encode the oldest ``n`` buffered tokens."""
        self._append_codes(self.buf_k[:, :, :n], self.buf_v[:, :, :n])
        self.buf_k = self.buf_k[:, :, n:].clone()
        self.buf_v = self.buf_v[:, :, n:].clone()

    def _flush_prompt(self, allowed) -> None:
        """First attend after a prefill with ``protect``: encode what the prefill would have
        encoded without it, keeping its best-scored tokens exact, then flush as usual.
        ``allowed`` ``(B, Q, seen)``."""
        q_len = allowed.shape[1]
        n = self.buf_k.shape[2] - q_len - self.buffer
        if n > 0:
            start = self.sink_k.shape[2] + self.n_comp
            # the last query of the step sees every older unpadded token: its row is the padding
            valid = allowed[:, -1, start : start + n]
            kept = self._keep_protected(self.buf_k[:, :, :n], self.buf_v[:, :, :n], valid)
            if kept is not None:
                self._store_kept()
            self._flush(n)
        self._chosen = True  # also when nothing was protected: a short prompt, or no scores
        n_buf = self.buf_k.shape[2]
        if n_buf >= self.buffer + self.flush:
            self._flush(n_buf - self.buffer)

    def _coded_mask(self, m: torch.Tensor) -> torch.Tensor:
        """``(B, Q, n_comp)``: the columns of the ``(B, Q, seen)`` mask ``m`` read from codes;
        a protected token is read exactly (``_kept_mask``), never from its code."""
        n_s, n_c = self.sink_k.shape[2], self.n_comp
        comp_mask = m[:, :, n_s : n_s + n_c]
        if self.kept_pos.shape[1]:
            slot = torch.where(self.kept_pos >= 0, self.kept_pos - n_s, n_c)
            coded = torch.ones(m.shape[0], n_c + 1, dtype=torch.bool, device=m.device)
            coded.scatter_(1, slot, False)
            comp_mask = comp_mask & coded[:, None, :n_c]
        return comp_mask

    def _store_kept(self) -> None:
        """Quantize the just-picked protected tokens (model dtype) as ``protect_dtype`` says."""
        if self.protect_dtype in _QUANTIZERS:
            quantize = _QUANTIZERS[self.protect_dtype][0]
            self.kept_k, self.kept_ks = quantize(self.kept_k)
            self.kept_v, self.kept_vs = quantize(self.kept_v)

    def kept_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The protected tokens' keys and values as attention reads them (model dtype)."""
        if self.protect_dtype not in _QUANTIZERS:
            return self.kept_k, self.kept_v
        dequantize = _QUANTIZERS[self.protect_dtype][1]
        return dequantize(self.kept_k, self.kept_ks), dequantize(self.kept_v, self.kept_vs)

    def attend(self, query, attention_mask, scaling, softcap=None):
        """Attention of ``query`` ``(B, H, Q, d)`` over everything this layer holds.

        ``attention_mask``: bool ``(B, 1, Q, seen)`` (True = attend) or None (then causal).
        ``softcap``: attention logit softcapping (Gemma2). Returns ``(B, Q, H, d)``.
        """
        b, _, q_len, _ = query.shape
        m = self._valid_mask(attention_mask, q_len, b, query.device)
        if self.protect > 0 and not self._chosen:
            self._flush_prompt(m)
        n_s, n_c = self.sink_k.shape[2], self.n_comp
        comp_mask = self._coded_mask(m)
        exact_mask = torch.cat([m[:, :, :n_s], self._kept_mask(m), m[:, :, n_s + n_c :]], dim=-1)
        kept_k, kept_v = self.kept_tokens()
        k_exact = torch.cat([self.sink_k, kept_k, self.buf_k], dim=2)
        v_exact = torch.cat([self.sink_v, kept_v, self.buf_v], dim=2)
        if q_len == 1:
            comp_mask, exact_mask = comp_mask[:, 0], exact_mask[:, 0]
        out = kvdict_attention(
            self._map_query(query),
            self.dk,
            self.dv,
            self.k_idx[:, :, :n_c],
            self.k_coef[:, :, :n_c],
            self.v_idx[:, :, :n_c],
            self.v_coef[:, :, :n_c],
            k_exact,
            v_exact,
            scaling,
            comp_mask=comp_mask,
            exact_mask=exact_mask,
            softcap=softcap,
        )
        return out.transpose(1, 2).contiguous()

    def _tensors(self):
        return (
            "sink_k", "sink_v", "kept_k", "kept_v", "kept_ks", "kept_vs", "kept_pos",
            "buf_k", "buf_v", "k_idx", "v_idx", "k_coef", "v_coef",
        )  # fmt: skip

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens (negative count, as transformers passes), buffer first."""
        if tokens_to_remove > 0:  # legacy form: the length to keep
            tokens_to_remove = tokens_to_remove - self.seen
        n = min(-tokens_to_remove, self.seen)
        if n <= 0 or not self.is_initialized:
            return
        self.seen -= n
        take = min(n, self.buf_k.shape[2])
        self.buf_k, self.buf_v = (
            self.buf_k[:, :, : self.buf_k.shape[2] - take],
            self.buf_v[:, :, : self.buf_v.shape[2] - take],
        )
        n -= take
        take = min(n, self.n_comp)
        self.n_comp -= take
        n -= take
        if take:  # protected tokens among the dropped codes go with them
            end = self.sink_k.shape[2] + self.n_comp
            self.kept_pos = torch.where(self.kept_pos < end, self.kept_pos, -1)
        if n:
            keep = self.sink_k.shape[2] - n
            self.sink_k, self.sink_v = self.sink_k[:, :, :keep], self.sink_v[:, :, :keep]


# -- method interface (see kvs_methods.py) -------------------------------------------------
BUFFERS = ("kvsurgery_dk", "kvsurgery_dv")  # every compressed layer has these
KEY_MAP = "kvsurgery_kmap"  # and this one when the block sets key_map
OPTIONAL_BUFFERS = (KEY_MAP,)


def buffer_names(block: dict) -> tuple[str, ...]:
    """The buffers each compressed layer of ``block`` carries."""
    return (*BUFFERS, KEY_MAP) if block.get("key_map") else BUFFERS


# Protected-token settings a block may carry (absent: the layer's defaults, no protection;
# no protect_dtype: stored as the model's dtype, as blocks before it was added).
OPTIONAL_KEYS = (*(name for name, _ in PROTECT_SETTINGS), "protect_dtype")
SUPPORTS_SOFTCAP = True  # attend() applies attention logit softcapping (Gemma2)


def _positive_int(value, where: str, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"config.kvsurgery.{where} must be an int >= {minimum}, got {value!r}.")


def validate(block: dict, num_layers: int) -> None:
    """Check the KV-Dict settings of a ``kvsurgery`` config block."""
    for i, spec in enumerate(block["layers"]):
        if spec.get("dense"):
            continue
        for key in ("s_k", "s_v", "n_atoms_k", "n_atoms_v"):
            _positive_int(spec.get(key), f"layers[{i}].{key}")
        if spec["s_k"] > spec["n_atoms_k"] or spec["s_v"] > spec["n_atoms_v"]:
            raise ValueError(f"config.kvsurgery.layers[{i}]: sparsity exceeds the number of atoms.")
    _positive_int(block.get("sinks"), "sinks", 0)
    _positive_int(block.get("buffer"), "buffer")
    _positive_int(block.get("flush"), "flush")
    for key, lo in PROTECT_SETTINGS:
        if key in block:
            _positive_int(block[key], key, lo)
    if block.get("protect_dtype", "model") not in PROTECT_DTYPES:
        raise ValueError(
            f"config.kvsurgery.protect_dtype must be one of {list(PROTECT_DTYPES)}, "
            f"got {block['protect_dtype']!r}."
        )
    if not isinstance(block.get("key_map", False), bool):
        raise ValueError(
            f"config.kvsurgery.key_map must be true or false, got {block['key_map']!r}."
        )
    if block.get("coef_dtype", "float8_e4m3fn") not in _COEF_DTYPES:
        raise ValueError(
            f"config.kvsurgery.coef_dtype must be one of {sorted(_COEF_DTYPES)}, "
            f"got {block.get('coef_dtype')!r}."
        )


def install_layer(mod, spec: dict, block: dict, tensors: dict | None) -> None:
    """Give one attention module its fp32 dictionaries and key map (NaN placeholders without
    ``tensors``: ``from_pretrained`` fills them)."""
    d, dev = mod.head_dim, next(mod.parameters()).device
    shapes = {"kvsurgery_dk": (d, spec["n_atoms_k"]), "kvsurgery_dv": (d, spec["n_atoms_v"])}
    if block.get("key_map"):
        n_kv = getattr(mod.config, "num_key_value_heads", None) or mod.config.num_attention_heads
        shapes[KEY_MAP] = (n_kv, d, d)
    elif hasattr(mod, KEY_MAP):  # re-installed without a map
        delattr(mod, KEY_MAP)
    for name, shape in shapes.items():
        if tensors is not None:
            t = tensors[name].detach().to(dev, torch.float32).clone()
        else:
            t = torch.full(shape, float("nan"), device=dev)
        mod.register_buffer(name, t, persistent=True)


def prepare_layer(i: int, mod, spec: dict, block: dict) -> None:
    """After the dictionaries are (re)loaded: check them, drop ``DᵀD`` cached for the old ones."""
    for name in BUFFERS:
        norms = getattr(mod, name).norm(dim=0)
        if (norms - 1).abs().max() > 1e-3:
            raise ValueError(
                f"layer {i} {name} atoms are not unit-norm (max deviation "
                f"{float((norms - 1).abs().max()):.3g}); the checkpoint's weights are damaged."
            )
    mod._kvs_gram_k = mod._kvs_gram_v = None
    mod._kvs_kmap = mod._kvs_qmap = None
    if block.get("key_map"):
        kmap = getattr(mod, KEY_MAP).double()
        sv = torch.linalg.svdvals(kmap)
        if bool((sv[:, -1] <= sv[:, 0] * 1e-6).any()):
            raise ValueError(
                f"layer {i} {KEY_MAP} is singular; the checkpoint's weights are damaged."
            )
        diag = torch.diagonal(kmap, dim1=-2, dim2=-1)
        if bool((kmap == torch.diag_embed(diag)).all()):
            mod._kvs_kmap = diag.float().contiguous()
            mod._kvs_qmap = (1 / diag).float().contiguous()
        else:
            mod._kvs_kmap = kmap.float()
            mod._kvs_qmap = torch.linalg.inv(kmap).transpose(-1, -2).float().contiguous()


def _gram(mod, which: str):
    """``DᵀD`` of a dictionary for the GPU OMP kernel, computed once per device the module
    is on; None on CPU, where OMP reads atoms instead (``omp_cpu``): no 64 MiB matrix per
    dictionary of 4096 atoms (3.8 GB for SmolLM2's 30 layers)."""
    D = getattr(mod, f"kvsurgery_d{which}")
    if D.device.type == "cpu":
        return None
    g = getattr(mod, f"_kvs_gram_{which}", None)
    if g is None or g.device != D.device:
        g = (D.T @ D).float()
        setattr(mod, f"_kvs_gram_{which}", g)
    return g


def make_layer(mod, spec: dict, block: dict) -> KVDictLayer:
    return KVDictLayer(
        mod.kvsurgery_dk,
        mod.kvsurgery_dv,
        _gram(mod, "k"),
        _gram(mod, "v"),
        spec["s_k"],
        spec["s_v"],
        sinks=block["sinks"],
        buffer=block["buffer"],
        flush=block["flush"],
        omp_tol=block.get("omp_tol"),
        coef_dtype=block.get("coef_dtype", "float8_e4m3fn"),
        kmap=mod._kvs_kmap,
        qmap=mod._kvs_qmap,
        **{k: block[k] for k in OPTIONAL_KEYS if k in block},
    )
