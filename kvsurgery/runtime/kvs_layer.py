"""What every compressed cache layer shares: sequence bookkeeping, measured bytes, batch
moves. Subclasses name their state tensors in ``_tensors()`` and keep ``self.seen`` (tokens
cached, in position order, so mask column j is token j). Copied flat into exports."""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin


class CompressedLayer(CacheLayerMixin):
    is_sliding = False
    is_croppable = True
    is_compileable = False
    supports_early_init = False

    def _tensors(self) -> tuple[str, ...]:
        raise NotImplementedError

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
