"""Choose the number of atoms per layer for keys and values from held-out error curves.

Pure: takes error curves, returns integers. A code of ``s`` atoms costs ``bytes_per_coef``
bytes per atom (int16 index + fp8 coefficient = 3) against ``2 d`` bytes of fp16, so a
layer's K+V cost ratio is ``3 (s_k + s_v) / (4 d)``.
"""

from __future__ import annotations

import heapq

import torch

__all__ = ["choose_sparsity", "compression_ratio"]


def compression_ratio(
    s_k: list[int],
    s_v: list[int],
    *,
    d: int,
    bytes_per_coef: int = 3,
    exact_fraction: float = 0.0,
    protected_fraction: float = 0.0,
) -> float:
    """Compressed bytes per token over fp16 bytes, all layers together.

    ``exact_fraction`` of the tokens (sinks and recent buffer) stay in fp16 and count at
    ratio 1: ``exact_fraction + (1 - exact_fraction) * sum_l bpc (s_k + s_v) / (L 4 d)``.
    ``protected_fraction``: the bytes of tokens kept besides their codes, over fp16 bytes of
    all tokens (protected tokens in fp16: their share of the tokens; in int8 about half).
    """
    code = bytes_per_coef * (sum(s_k) + sum(s_v)) / (len(s_k) * 4 * d)
    return exact_fraction + protected_fraction + (1.0 - exact_fraction) * code


def _curves(err_k, err_v) -> tuple[torch.Tensor, torch.Tensor]:
    ek = torch.as_tensor(err_k, dtype=torch.float64).cpu()
    ev = torch.as_tensor(err_v, dtype=torch.float64).cpu()
    if ek.dim() != 2 or ek.shape != ev.shape or ek.shape[0] == 0 or ek.shape[1] == 0:
        raise ValueError(
            f"err_k and err_v must both be (L, s_max) with L, s_max >= 1, got "
            f"{tuple(ek.shape)} and {tuple(ev.shape)}"
        )
    return ek, ev


def choose_sparsity(
    err_k,
    err_v,
    *,
    bytes_per_coef: int = 3,
    d: int,
    target_ratio: float | None = None,
    max_error: float | None = None,
    s_min: int = 1,
    s_max: int | None = None,
    exact_fraction: float = 0.0,
    protected_fraction: float = 0.0,
    key_weight: float = 1.0,
) -> tuple[list[int], list[int]]:
    """Atoms per layer for keys and values.

    Args:
        err_k, err_v: ``(L, S)`` held-out mean relative error per layer; column ``j`` is the
            error with ``j + 1`` atoms (e.g. stacked :func:`kvsurgery.dictlearn.sparsity_curve`).
        bytes_per_coef: bytes stored per atom (index + coefficient).
        d: vector dimension (fp16 costs ``2 d`` bytes per vector).
        target_ratio: budget on :func:`compression_ratio` (effective, ``exact_fraction``
            included). Atoms are handed out greedily: start everywhere at ``s_min`` and
            repeatedly add one atom where the error drops most (all atoms cost the same
            bytes, so this is the largest drop per byte) until the next would exceed the
            budget or no atom lowers the error. Ties go to the lower layer, keys first.
            The choices for a larger budget extend those for a smaller one, so ``s`` is
            monotone in ``target_ratio``.
        max_error: instead of a budget, the smallest ``s`` in ``[s_min, s_max]`` per layer and
            per K/V whose error is ``<= max_error`` (``s_max`` where none is).
        s_min, s_max: bounds on every ``s`` (``s_max`` defaults to ``S``).
        exact_fraction: share of tokens kept in fp16, in ``[0, 1)``.
        protected_fraction: bytes kept besides the codes (protected tokens) over fp16 bytes
            of all tokens (>= 0); see :func:`compression_ratio`.
        key_weight: how much more a unit of key error costs than a unit of value error
            (> 0): key gains are multiplied by it in the budget mode, and the key bound is
            ``max_error / key_weight`` in the error mode.

    Returns:
        ``(s_k, s_v)``: two lists of ``L`` ints.

    Raises:
        ValueError: both or neither of ``target_ratio``/``max_error``; bounds outside the
            curves; a ``target_ratio`` below what ``s_min`` atoms everywhere already cost.
    """
    if (target_ratio is None) == (max_error is None):
        raise ValueError("give exactly one of target_ratio and max_error")
    ek, ev = _curves(err_k, err_v)
    n_layers, depth = ek.shape
    s_max = depth if s_max is None else s_max
    if not 1 <= s_min <= s_max <= depth:
        raise ValueError(
            f"need 1 <= s_min <= s_max <= {depth} (the curves' length), got s_min={s_min}, "
            f"s_max={s_max}"
        )
    if not 0.0 <= exact_fraction < 1.0:
        raise ValueError(f"exact_fraction must be in [0, 1), got {exact_fraction}")
    if not protected_fraction >= 0.0:
        raise ValueError(f"protected_fraction must be >= 0, got {protected_fraction}")
    if not key_weight > 0:
        raise ValueError(f"key_weight must be > 0, got {key_weight}")
    if d < 1 or bytes_per_coef < 1:
        raise ValueError(
            f"d and bytes_per_coef must be >= 1, got d={d}, bytes_per_coef={bytes_per_coef}"
        )

    if max_error is not None:
        return (
            _by_error(ek, max_error / key_weight, s_min, s_max),
            _by_error(ev, max_error, s_min, s_max),
        )

    floor = compression_ratio(
        [s_min] * n_layers, [s_min] * n_layers, d=d, bytes_per_coef=bytes_per_coef,
        exact_fraction=exact_fraction, protected_fraction=protected_fraction,
    )  # fmt: skip
    if target_ratio < floor - 1e-12:
        raise ValueError(
            f"target_ratio={target_ratio:g} is unreachable: s_min={s_min} atoms for keys and "
            f"values in all {n_layers} layers already give a ratio of {floor:.4f} "
            f"(d={d}, {bytes_per_coef} bytes per atom, exact_fraction={exact_fraction:g}, "
            f"protected_fraction={protected_fraction:g})"
        )
    # Budget in atoms: sum(s_k + s_v) * bpc <= code_ratio * L * 4d.
    code_ratio = (target_ratio - exact_fraction - protected_fraction) / (1.0 - exact_fraction)
    budget = int(code_ratio * n_layers * 4 * d / bytes_per_coef + 1e-9)
    chosen = [[s_min] * n_layers, [s_min] * n_layers]
    curves = (ek, ev)
    spent = 2 * n_layers * s_min
    heap: list[tuple[float, int, int]] = []

    def push(kind: int, layer: int) -> None:
        s = chosen[kind][layer]
        if s < s_max:
            curve = curves[kind][layer]
            # Error with s atoms is curve[s - 1]; one more atom gives curve[s].
            gain = float(curve[s - 1] - curve[s]) * (key_weight if kind == 0 else 1.0)
            heapq.heappush(heap, (-gain, layer, kind))

    for layer in range(n_layers):
        for kind in (0, 1):
            push(kind, layer)
    while heap and spent < budget:
        neg_gain, layer, kind = heapq.heappop(heap)
        if -neg_gain <= 0.0:
            break
        chosen[kind][layer] += 1
        spent += 1
        push(kind, layer)
    return chosen[0], chosen[1]


def _by_error(err: torch.Tensor, max_error: float, s_min: int, s_max: int) -> list[int]:
    out = []
    for curve in err:
        ok = (curve[s_min - 1 : s_max] <= max_error).nonzero()
        out.append(s_min + int(ok[0]) if len(ok) else s_max)
    return out
