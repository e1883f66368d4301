"""SubGen cache layer: exact sinks and recent window, everything older streamed into
threshold clusters (softmax normaliser) and an l2 value reservoir (value product), or,
with kvsurgery's ``mean`` estimator, into at most ``max_clusters`` cluster means.

Paper: "SubGen: Token Generation in Sublinear Time and Memory" (one version is titled
ClusterGen). The maths and kernels are in ``kernels/subgen.py``. This file is copied flat
into exported checkpoints: it imports only torch, transformers and its sibling modules.

Token order inside a layer is the order of positions, so column ``j`` of the attention
mask is token ``j`` of the layer for every batch row. Regions of one batch row::

    [ sinks | streamed (clusters + value reservoir) | window ... current ]
      exact   estimated, O(d (C t + s)) memory        exact

  plus, with ``protect > 0``, up to ``protect`` streamed tokens per sequence kept exact
  (``kept_k/kept_v``, their positions in ``kept_pos``) instead of being merged.

* ``update`` stores new tokens in the window and returns them unchanged: attention with
  no past (prefill) is dense over them.
* ``attend`` first streams the tokens that have left the window into the estimator state
  (padded tokens, seen in the mask, are skipped), then attends: exact over sinks and
  window, SubGen estimate over the streamed tokens, one softmax with a shared max.
  Only tokens that were cached *before* the current step are streamed, so every query of
  a multi-query step (chunked prefill, teacher forcing) is older than every streamed
  token: the estimate is correct for each of them, and causality inside the step is the
  mask's business on the exact part.
* Protected tokens (beyond the paper; see ``kvs_layer.py``): the first stream after the
  prefill keeps the ``protect`` best-scored streamed tokens of each sequence exact, in
  every kv head, rather than merging them.
"""

from __future__ import annotations

import torch

from ..kernels.subgen import (
    ESTIMATORS,
    STATE_KEYS,
    append,
    estimate_attention,
    merge_append,
    new_state,
)
from .kvs_layer import PROTECT_SETTINGS, CompressedLayer

# Cluster storage grows (and is trimmed back) by blocks of this many clusters: one
# reallocation per block keeps appends amortised O(1).
CLUSTER_BLOCK = 32


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


class SubGenLayer(CompressedLayer):
    """One layer of a SubGen cache.

    State (allocated on first ``update``; batch dimension first everywhere):
      ``sink_k/sink_v`` ``(B, H_kv, <=sinks, d)`` and ``win_k/win_v`` ``(B, H_kv, n_win, d)``
      exact tokens, model dtype;
      ``centres`` ``(B, H_kv, Cap, d)`` model dtype, ``counts`` ``(B, H_kv, Cap)`` int32 (0 for
      unused), ``n_clusters`` ``(B, H_kv)`` int32, ``samples`` ``(B, H_kv, Cap, t, d)``;
      ``res_k/res_v`` ``(B, H_kv, s, d)`` value reservoir, ``res_orig`` ``(B, H_kv, s)`` int8
      (slot still holds one of the first s tokens), ``n_val`` ``(B, H_kv)`` int32 tokens
      streamed, ``mu``/``mu_s`` ``(B, H_kv)`` fp32 running ``sum |v|^2`` (now / when the
      s-th token came). Field semantics: ``kernels/subgen.py`` ``append_ref``. With the
      mean estimator ``samples``/``sample_v`` ``(B, H_kv, Cap, 1, d)`` hold each cluster's
      mean key and mean value, ``centres`` and the value reservoir have no rows
      (``merge_append``).

    Settings: ``delta`` cluster radius (a float, or one per kv head), or ``delta_rel``: the
    radius as a fraction of the median key norm of the first streamed keys of each head
    (training-free use); ``t`` key samples per cluster; ``s`` value slots; ``sinks`` first
    tokens and ``window`` last tokens kept exact; ``seed`` of the reservoir draws;
    ``max_clusters`` (optional) clusters per kv head, after which a key that is within
    ``delta`` of no centre joins the nearest one: the streamed state then stops growing.

    ``estimator="mean"`` (beyond the paper) replaces both streamed structures with mean
    clusters: at most ``max_clusters`` (required) per kv head, each the mean key, mean value
    and count of its members, read at attention as one token of logit ``l(mean key) +
    log(count)``; the tokens stay exact until the cap is reached, the append that first
    overflows it runs ``kmeans_iters`` rounds of k-means, later tokens join the nearest
    mean. No radius, samples or value slots (``delta``, ``t``, ``s`` are ignored), no draws.
    """

    def __init__(
        self,
        *,
        delta: float | list[float] | None = None,
        delta_rel: float | None = None,
        t: int = 4,
        s: int = 256,
        sinks: int = 4,
        window: int = 256,
        seed: int = 0,
        max_clusters: int | None = None,
        estimator: str = "sampled",
        kmeans_iters: int = 6,
        protect: int = 0,
        protect_window: int = 32,
        protect_pool: int = 9,
    ):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(
                f"SubGenLayer estimator must be one of {ESTIMATORS}, got {estimator!r}"
            )
        self.estimator = estimator
        self.kmeans_iters = int(kmeans_iters)
        if estimator == "mean":
            if max_clusters is None:
                raise ValueError(
                    "SubGenLayer estimator='mean' needs max_clusters (the clusters kept per kv "
                    "head); without a cap nothing would be merged"
                )
            if self.kmeans_iters < 1:
                raise ValueError(f"SubGenLayer kmeans_iters must be >= 1, got {kmeans_iters}")
            # no radius, one (mean key, mean value) slot per cluster, no value reservoir
            delta, delta_rel, t, s = None, None, 1, 0
        elif (delta is None) == (delta_rel is None):
            raise ValueError("SubGenLayer needs exactly one of delta or delta_rel")
        deltas = (
            [] if delta is None else list(delta) if isinstance(delta, (list, tuple)) else [delta]
        )
        for x in deltas + ([] if delta_rel is None else [delta_rel]):
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not x > 0:
                raise ValueError(f"SubGenLayer cluster radius must be > 0, got {x!r}")
        self.delta = None if delta is None else torch.tensor(deltas, dtype=torch.float32)
        self.delta_rel = delta_rel
        self.t, self.s = int(t), int(s)
        self.sinks, self.window, self.seed = int(sinks), int(window), int(seed)
        self._set_protect(protect, protect_window, protect_pool)
        s_min = 0 if estimator == "mean" else 1
        for name, lo in (("t", 1), ("s", s_min), ("sinks", 0), ("window", 1), ("seed", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"SubGenLayer {name} must be >= {lo}, got {getattr(self, name)}")
        if max_clusters is not None and (isinstance(max_clusters, bool) or max_clusters < 1):
            raise ValueError(f"SubGenLayer max_clusters must be >= 1, got {max_clusters!r}")
        self.max_clusters = None if max_clusters is None else int(max_clusters)
        self.seen = 0
        self.n_comp = 0  # positions streamed (padding included)
        self.last_had_past = False

    # -- allocation -------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        dv = value_states.shape[-1]
        if dv != d:
            raise ValueError(f"SubGenLayer needs value dim == key dim, got {dv} and {d}")
        self.dtype, self.device = key_states.dtype, key_states.device
        dev = self.device
        empty = key_states.new_zeros(b, h, 0, d)
        self.sink_k, self.sink_v = empty, empty.clone()
        self.win_k, self.win_v = empty.clone(), empty.clone()
        self.kept_k, self.kept_v = empty.clone(), empty.clone()
        self.kept_pos = torch.zeros(b, 0, dtype=torch.int64, device=dev)
        self._chosen = False  # protected tokens picked (once per sequence)
        state = new_state(b * h, 0, self.t, self.s, d, self.dtype, dev, self.estimator)
        for name, x in state.items():
            setattr(self, name, x.view(b, h, *x.shape[1:]))
        if self.delta is not None:
            if self.delta.numel() not in (1, h):
                raise ValueError(
                    f"SubGenLayer got {self.delta.numel()} radii for {h} kv heads (give 1 or {h})"
                )
            self._delta_h = self.delta.to(dev).expand(h).contiguous()
        else:
            self._delta_h = None  # set from the first streamed keys
        self._gen = torch.Generator(device=dev).manual_seed(self.seed)
        self.keys = self.values = None  # no dense views: most tokens are not kept
        self.is_initialized = True

    def _resize_clusters(self, cap: int) -> None:
        b, h, old, d = self.samples.shape[:3] + self.samples.shape[4:]
        keep = min(old, cap)

        def resized(x, *tail):
            out = x.new_zeros(b, h, cap, *tail)
            out[:, :, :keep] = x[:, :, :keep]
            return out

        if self.estimator == "sampled":  # the mean estimator has no fixed centres
            self.centres = resized(self.centres, d)
        self.counts = resized(self.counts)
        self.samples = resized(self.samples, self.t, d)
        self.sample_v = resized(self.sample_v, self.sample_v.shape[3], d)

    # -- cache verbs ------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        """Store new tokens ``(B, H_kv, T, d)``; returns them unchanged (prefill attention is dense)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.last_had_past = self.seen > 0
        self.seen += key_states.shape[2]
        # the stored state is not differentiable (clusters, samples): keep no graph
        k, v = self._take_sinks(key_states.detach(), value_states.detach())
        self.win_k = torch.cat([self.win_k, k], dim=2)
        self.win_v = torch.cat([self.win_v, v], dim=2)
        return key_states, value_states

    def _stream(self, n: int, valid: torch.Tensor) -> None:
        """Move the oldest ``n`` window tokens into the estimator state.

        ``valid`` ``(B, n)`` bool: padded tokens are dropped, never streamed.
        """
        B, H, _, d = self.win_k.shape
        BH = B * H
        k, v = self.win_k[:, :, :n], self.win_v[:, :, :n]
        valid = valid & ~self._protect(n, valid)
        ok = valid[:, None, :].expand(B, H, n).reshape(BH, n)
        if self.estimator == "sampled" and self._delta_h is None:
            # median key norm of this head's valid streamed keys, over the batch
            norms = k.float().norm(dim=-1).transpose(0, 1).reshape(H, B * n)
            okh = valid[None].expand(H, B, n).reshape(H, B * n)
            med = [
                norms[i][okh[i]].median() if bool(okh[i].any()) else norms.new_ones(())
                for i in range(H)
            ]
            self._delta_h = (torch.stack(med) * self.delta_rel).clamp_min(1e-6).contiguous()
        need = int(self.n_clusters.max()) + n
        room = _round_up(need, CLUSTER_BLOCK)
        if self.max_clusters is not None:  # never past the cap (its bytes are the target)
            need, room = min(need, self.max_clusters), min(room, self.max_clusters)
        if need > self.samples.shape[2]:
            self._resize_clusters(room)
        cap = self.samples.shape[2]
        dev = self.device
        kf = k.reshape(BH, n, d)
        vf = v.reshape(BH, n, d)
        rows = {n: getattr(self, n).view(BH, *getattr(self, n).shape[2:]) for n in STATE_KEYS}
        if self.estimator == "mean":
            merge_append(kf, vf, ok, rows, self.max_clusters, self.kmeans_iters)
        else:
            u_clu = torch.rand(BH, n, self.t, generator=self._gen, device=dev)
            u_val = torch.rand(BH, n, self.s, generator=self._gen, device=dev)
            append(kf, vf, ok, self._delta_h.repeat(B), rows, u_clu, u_val, self.max_clusters)
        self.win_k = self.win_k[:, :, n:].clone()
        self.win_v = self.win_v[:, :, n:].clone()
        self.n_comp += n
        # a bulk append reserved room for every token to open a cluster: give it back
        used = _round_up(max(int(self.n_clusters.max()), 1), CLUSTER_BLOCK)
        if cap - used >= CLUSTER_BLOCK:
            self._resize_clusters(used)

    def _protect(self, n: int, valid: torch.Tensor) -> torch.Tensor:
        """Keep the best-scored of the ``n`` tokens about to be streamed exact (once per
        sequence, from the prompt scores); returns ``(B, n)`` bool, True = kept."""
        kept = torch.zeros_like(valid)
        choice = self._keep_protected(self.win_k[:, :, :n], self.win_v[:, :, :n], valid)
        if choice is not None:
            kept.scatter_(1, *choice)
        return kept

    def attend(self, query, attention_mask, scaling):
        """Attention of ``query`` ``(B, H, Q, d)`` over everything this layer holds.

        ``attention_mask``: bool ``(B, 1, Q, seen)`` (True = attend), additive float, or
        None (then causal). Returns ``(B, Q, H, d)``.
        """
        q_len = query.shape[2]
        allowed = self._valid_mask(attention_mask, q_len, self.win_k.shape[0], query.device)
        n_s = self.sink_k.shape[2]
        start = n_s + self.n_comp
        # stream what left the window, but never a token of this step (see module doc)
        limit = min(self.seen - q_len, self.seen - self.window)
        if limit > start:
            # the last query sees every older unpadded token: its row is the padding mask
            self._stream(limit - start, allowed[:, -1, start:limit])
            start = limit
        kept_ok = self._kept_mask(allowed)
        mask = torch.cat([allowed[:, :, :n_s], kept_ok, allowed[:, :, start:]], dim=-1)
        out = estimate_attention(
            query,
            torch.cat([self.sink_k, self.kept_k, self.win_k], dim=2),
            torch.cat([self.sink_v, self.kept_v, self.win_v], dim=2),
            mask,
            {n: getattr(self, n) for n in STATE_KEYS},
            scaling,
        )
        return out.transpose(1, 2).contiguous()

    # -- bookkeeping ------------------------------------------------------------------
    def _tensors(self):
        return ("sink_k", "sink_v", "kept_k", "kept_v", "kept_pos", "win_k", "win_v", *STATE_KEYS)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens (negative count, as transformers passes).

        Only exact tokens can be dropped: a streamed token's contribution to the clusters
        and reservoirs cannot be undone, so cropping into them raises.
        """
        if tokens_to_remove > 0:  # legacy form: the length to keep
            tokens_to_remove = tokens_to_remove - self.seen
        n = min(-tokens_to_remove, self.seen)
        if n <= 0 or not self.is_initialized:
            return
        n_win = self.win_k.shape[2]
        if n > n_win and self.n_comp > 0:
            raise ValueError(
                f"SubGen cannot crop {n} tokens: only the {n_win} newest are still exact, the "
                "older ones are merged into clusters and reservoirs (not reversible)."
            )
        self.seen -= n
        take = min(n, n_win)
        self.win_k = self.win_k[:, :, : n_win - take]
        self.win_v = self.win_v[:, :, : n_win - take]
        n -= take
        if n:
            keep = self.sink_k.shape[2] - n
            self.sink_k, self.sink_v = self.sink_k[:, :, :keep], self.sink_v[:, :, :keep]


# -- method interface (see kvs_methods.py) -------------------------------------------------
BUFFERS: tuple[str, ...] = ()  # SubGen calibrates settings (radii, t, s), not tensors
# Settings a layer spec may carry (calibrated per layer); the block's globals fill the rest.
LAYER_KEYS = ("delta", "t", "s", "max_clusters", "protect")
GLOBAL_KEYS = (
    "delta_rel",
    "sinks",
    "window",
    "seed",
    "estimator",
    "kmeans_iters",
    "protect_window",
    "protect_pool",
)
# Settings a block may leave out: the layer's own defaults then apply.
OPTIONAL_KEYS = ("kmeans_iters", *(name for name, _ in PROTECT_SETTINGS))


def _setting(spec: dict, block: dict, key: str):
    return spec[key] if key in spec else block.get(key)


def _where(spec: dict, i: int, key: str) -> str:
    return f"layers[{i}].{key}" if key in spec else key


def validate(block: dict, num_layers: int) -> None:
    """Check the SubGen settings of a ``kvsurgery`` config block."""
    estimator = block.get("estimator", "sampled")
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"config.kvsurgery.estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}."
        )
    mean = estimator == "mean"
    ints = (("sinks", 0), ("window", 1), ("seed", 0))
    ints += PROTECT_SETTINGS
    ints += (("kmeans_iters", 1),) if mean else (("t", 1), ("s", 1))
    for i, spec in enumerate(block["layers"]):
        if spec.get("dense"):
            continue
        for key, lo in ints:
            v = _setting(spec, block, key)
            if key in OPTIONAL_KEYS and v is None:
                continue  # the layer's default
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(
                    f"config.kvsurgery.{_where(spec, i, key)} must be an int >= {lo}, got {v!r}."
                )
        cap = _setting(spec, block, "max_clusters")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise ValueError(
                f"config.kvsurgery.{_where(spec, i, 'max_clusters')} must be an int >= 1 or "
                f"null (no cap), got {cap!r}."
            )
        if mean:
            if cap is None:
                raise ValueError(
                    f"config.kvsurgery.{_where(spec, i, 'max_clusters')} is null, but the mean "
                    "estimator needs a cluster cap per layer (calibration writes it)."
                )
            continue  # no radius, samples or value slots
        delta, rel = _setting(spec, block, "delta"), block.get("delta_rel")
        if delta is None and rel is None:
            raise ValueError(
                f"config.kvsurgery.layers[{i}] has no delta and the block no delta_rel: "
                "SubGen needs a cluster radius."
            )
        radii = [rel] if delta is None else delta if isinstance(delta, list) else [delta]
        for x in radii:
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not x > 0:
                key = "delta_rel" if delta is None else _where(spec, i, "delta")
                raise ValueError(f"config.kvsurgery.{key} must be > 0, got {x!r}.")


def install_layer(mod, spec: dict, block: dict, tensors: dict | None) -> None:
    """Nothing to store on the module: the layer is built from the settings alone."""


def prepare_layer(i: int, mod, spec: dict, block: dict) -> None:
    """No derived state."""


def make_layer(mod, spec: dict, block: dict) -> SubGenLayer:
    delta = _setting(spec, block, "delta")
    return SubGenLayer(
        delta=delta,
        delta_rel=None if delta is not None else block.get("delta_rel"),
        t=_setting(spec, block, "t"),
        s=_setting(spec, block, "s"),
        sinks=block["sinks"],
        window=block["window"],
        # decorrelate the layers' reservoir draws
        seed=int(block.get("seed", 0)) * 100_003 + int(getattr(mod, "layer_idx", 0)),
        max_clusters=_setting(spec, block, "max_clusters"),
        estimator=block.get("estimator", "sampled"),
        **{k: v for k in OPTIONAL_KEYS if (v := _setting(spec, block, k)) is not None},
    )
