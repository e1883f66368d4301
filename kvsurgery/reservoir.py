"""Bounded uniform sampling of vectors (pure tensor code, no I/O).

Bottom-k reservoir: every incoming row gets a random tag in [0, 1) and the reservoir keeps
the ``capacity`` rows with the smallest tags, which is a uniform sample without
replacement of everything seen. Tags come from a generator seeded per (seed, stream,
step), so a run interrupted after any step and resumed from its saved reservoir ends with
exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import hashlib

import torch


def step_generator(seed: int, *keys) -> torch.Generator:
    """A CPU generator whose state depends only on ``seed`` and ``keys`` (stable across runs)."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


class Reservoir:
    """At most ``capacity`` rows of several aligned tensors (same first dimension).

    ``fields``: name -> tensor ``(n, ...)``; ``tags``: ``(n,)`` float64.
    """

    def __init__(self, capacity: int, fields: dict[str, torch.Tensor] | None = None, tags=None):
        self.capacity = capacity
        self.fields = fields or {}
        self.tags = tags if tags is not None else torch.empty(0, dtype=torch.float64)
        self.seen = 0

    def __len__(self) -> int:
        return self.tags.numel()

    def add(self, rows: dict[str, torch.Tensor], generator: torch.Generator) -> None:
        """Offer ``rows`` (name -> ``(m, ...)``); keeps the ``capacity`` smallest tags overall."""
        m = next(iter(rows.values())).shape[0]
        self.seen += m
        new_tags = torch.rand(m, generator=generator, dtype=torch.float64)
        if not self.fields:
            self.fields = {k: v[:0].clone() for k, v in rows.items()}
        tags = torch.cat([self.tags, new_tags])
        merged = {k: torch.cat([self.fields[k], rows[k].to(self.fields[k].dtype)]) for k in rows}
        if tags.numel() > self.capacity:
            keep = torch.topk(tags, self.capacity, largest=False, sorted=False).indices
            # Row order by tag makes the stored reservoir independent of arrival order.
            keep = keep[torch.argsort(tags[keep])]
        else:
            keep = torch.argsort(tags)
        self.tags = tags[keep]
        self.fields = {k: v[keep] for k, v in merged.items()}

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {f"{prefix}{k}": v.contiguous() for k, v in self.fields.items()}
        out[f"{prefix}tags"] = self.tags.contiguous()
        out[f"{prefix}seen"] = torch.tensor([self.seen], dtype=torch.int64)
        return out

    @classmethod
    def from_state(cls, capacity: int, state: dict[str, torch.Tensor], prefix: str = ""):
        fields = {
            k[len(prefix) :]: v
            for k, v in state.items()
            if k.startswith(prefix) and k[len(prefix) :] not in ("tags", "seen")
        }
        r = cls(capacity, fields, state[f"{prefix}tags"])
        r.seen = int(state[f"{prefix}seen"][0])
        return r
