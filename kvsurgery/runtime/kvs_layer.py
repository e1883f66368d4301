"""What every compressed cache layer shares: sequence bookkeeping, measured bytes, batch
moves, and protected tokens. Subclasses name their state tensors in ``_tensors()`` and keep
``self.seen`` (tokens cached, in position order, so mask column j is token j). Copied flat
into exports.

Protected tokens (beyond the papers; SubGen and KV-Dict use them): at a dense prefill every
layer ``observe``s the attention of the prompt's last ``protect_window`` queries (SnapKV's
observation window) into :class:`PromptScores` shared by the layers of one cache
(:func:`link_prompt_scores`); when the prompt is compressed, the ``protect`` best-scored
tokens of each sequence are kept exact, in every kv head. A question at the end of the
prompt thereby keeps the passage it asks about. The choice is made once per sequence.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

# Protected-token settings and their least values: layers and config blocks check these.
PROTECT_SETTINGS = (("protect", 0), ("protect_window", 1), ("protect_pool", 1))


class CompressedLayer(CacheLayerMixin):
    is_sliding = False
    is_croppable = True
    is_compileable = False
    supports_early_init = False
    protect = 0  # set by _set_protect in layers that protect tokens (see the module doc)
    scores = None  # the cache's PromptScores, given by link_prompt_scores
    _chosen = False

    def _tensors(self) -> tuple[str, ...]:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the sequence, and the prompt scores the cache's layers share."""
        self.is_initialized = False
        self.seen = self.n_comp = 0
        if self.scores is not None:
            self.scores.total = None

    def _after_batch_map(self) -> None:
        """Hook for subclasses that keep views of their state tensors."""

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes this layer has allocated (tensor storages, measured, not computed)."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, n).untyped_storage().nbytes() for n in self._tensors())

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            for n in self._tensors():
                setattr(self, n, fn(getattr(self, n)))
            self._after_batch_map()

    def reorder_cache(self, beam_idx):
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._map_batch(lambda t: t[indices])

    # -- helpers of layers that keep exact sinks and read the attention mask ---------------
    def _take_sinks(self, k, v):
        """Append the first new tokens to ``sink_k/sink_v`` until ``self.sinks`` are held;
        return the rest of ``k, v``."""
        room = self.sinks - self.sink_k.shape[2]
        if room > 0:
            self.sink_k = torch.cat([self.sink_k, k[:, :, :room]], dim=2)
            self.sink_v = torch.cat([self.sink_v, v[:, :, :room]], dim=2)
            k, v = k[:, :, room:], v[:, :, room:]
        return k, v

    def _valid_mask(self, attention_mask, q_len: int, batch: int, device) -> torch.Tensor:
        """Bool ``(B, Q, seen)``, True = attend, from the 4-D mask (or causal if None)."""
        if attention_mask is None:
            q_pos = torch.arange(self.seen - q_len, self.seen, device=device)
            allowed = torch.arange(self.seen, device=device)[None, :] <= q_pos[:, None]
            return allowed[None].expand(batch, q_len, self.seen)
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask > -1  # additive masks: 0 = attend, -inf = masked
        return attention_mask[:, 0, :, -self.seen :].expand(batch, q_len, self.seen)

    # -- protected tokens (layers that protect set them up with ``_set_protect`` and keep
    # ``sink_k``, ``n_comp``, ``kept_k/kept_v/kept_pos``) ---------------------------------
    def _set_protect(self, protect: int, window: int, pool: int) -> None:
        self.protect, self.protect_window, self.protect_pool = int(protect), int(window), int(pool)
        for name, lo in PROTECT_SETTINGS:
            if getattr(self, name) < lo:
                raise ValueError(
                    f"{type(self).__name__} {name} must be >= {lo}, got {getattr(self, name)}"
                )

    @torch.no_grad()  # a choice of tokens, not a differentiable output: also under autograd
    def observe(self, query, key, attention_mask, scaling) -> None:
        """Dense prefill (no past): add this layer's attention from the last
        ``protect_window`` queries to each cached position into the shared prompt scores."""
        if self.protect == 0 or self.scores is None or self._chosen:
            return
        B, H, q_len, d = query.shape
        hk = key.shape[1]
        o = min(self.protect_window, q_len)
        allowed = self._valid_mask(attention_mask, q_len, B, query.device)[:, -o:]
        g = H // hk
        q = query[:, :, -o:].float().reshape(B, hk, g * o, d)  # query heads of a kv head
        logits = (q @ key.float().transpose(-1, -2)) * scaling  # (B, hk, g o, seen)
        mask = allowed[:, None].expand(B, g, o, -1).reshape(B, 1, g * o, -1)
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
        per_head = probs.sum(2)  # (B, hk, seen)
        # the sinks (always exact) soak up much of it, unevenly across layers: leave them
        # out before normalising, so that every layer's ranking of the rest counts the same
        per_head[..., : self.sink_k.shape[2]] = 0.0
        per_head = per_head / per_head.sum(-1, keepdim=True).clamp_min(1e-30)
        self.scores.add(per_head.mean(1), self.protect_pool)

    def _keep_protected(self, k, v, valid):
        """Keep the best-scored of the tokens ``k, v`` ``(B, H, n, d)`` that are about to be
        compressed (they follow the sinks and the ``n_comp`` compressed positions) exact in
        ``kept_k/kept_v``, their positions in ``kept_pos`` (-1: a spare slot of a row with
        fewer scored tokens). Once per sequence, from the prompt scores. ``valid`` ``(B, n)``
        bool: padding is never kept. Returns ``(top (B, p) offsets in position order,
        picked (B, p) bool)``, or None when nothing is to be protected."""
        scores = None if self.scores is None else self.scores.total
        if self.protect == 0 or self._chosen or scores is None:
            return None
        self._chosen = True
        B, n = valid.shape
        start = self.sink_k.shape[2] + self.n_comp
        sc = torch.full((B, n), float("-inf"), device=valid.device)
        m = max(0, min(n, scores.shape[1] - start))  # positions the prefill scored
        sc[:, :m] = scores[:, start : start + m].to(sc.device)
        sc = torch.where(valid, sc, float("-inf"))
        p = min(self.protect, n)
        top = sc.topk(p, dim=1).indices.sort(dim=1).values  # (B, p), in position order
        picked = sc.gather(1, top) > float("-inf")
        idx = top[:, None, :, None].expand(B, k.shape[1], p, k.shape[3])
        self.kept_k, self.kept_v = k.gather(2, idx), v.gather(2, idx)
        self.kept_pos = torch.where(picked, top + start, -1)
        return top, picked

    def _kept_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """``(B, Q, P)`` mask of the protected tokens: their positions' columns of the
        ``(B, Q, seen)`` mask ``allowed``; slots marked -1 in ``kept_pos`` are masked."""
        q_len = allowed.shape[1]
        pos = self.kept_pos.clamp_min(0)[:, None, :].expand(-1, q_len, -1)
        return allowed.gather(2, pos) & (self.kept_pos >= 0)[:, None, :]


class PromptScores:
    """Attention paid to each prompt position by the prompt's last queries: per layer
    normalised to 1 per sequence (sinks left out) and max-pooled over neighbouring
    positions, so that a protected token keeps its context (the words around a fact are
    what a later query matches); over the layers of one cache, the maximum. The maximum,
    not the sum: only some layers look back at the passage a question asks about, and
    their peaks are lost in a sum over the diffuse rest (SmolLM2, needle at 2k)."""

    def __init__(self):
        self.total = None  # (B, seen) float32, or None before a prefill

    def add(self, scores: torch.Tensor, pool: int) -> None:
        if pool > 1:
            scores = torch.nn.functional.max_pool1d(
                scores[:, None], pool, stride=1, padding=pool // 2, ceil_mode=False
            )[:, 0, : scores.shape[1]]
        if self.total is None or self.total.shape != scores.shape:
            self.total = scores.clone()
        else:
            torch.maximum(self.total, scores, out=self.total)


def link_prompt_scores(layers: list) -> None:
    """Give the layers of one cache that protect tokens a shared :class:`PromptScores`."""
    scores = PromptScores()
    for layer in layers:
        if getattr(layer, "protect", 0):
            layer.scores = scores
