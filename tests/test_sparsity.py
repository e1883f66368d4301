"""Tests for kvsurgery.sparsity.choose_sparsity."""

import pytest
import torch

from kvsurgery.sparsity import choose_sparsity, compression_ratio

L, S, D = 6, 16, 64


def _curves(seed=0):
    """Decreasing error curves with a different steepness per layer."""
    g = torch.Generator().manual_seed(seed)
    rates = 0.05 + 0.4 * torch.rand(2, L, 1, generator=g)
    start = 0.5 + 0.4 * torch.rand(2, L, 1, generator=g)
    s = torch.arange(1, S + 1)
    err = start * torch.exp(-rates * (s - 1))
    return err[0], err[1]


@pytest.mark.parametrize("exact_fraction", [0.0, 0.1])
def test_budget_respected_and_nearly_spent(exact_fraction):
    ek, ev = _curves()
    atom = (1 - exact_fraction) * 3 / (L * 4 * D)  # ratio cost of one atom
    for target in torch.linspace(0.05, 0.45, 17).tolist():
        target = max(target, exact_fraction + (1 - exact_fraction) * 2 * L * 3 / (L * 4 * D))
        sk, sv = choose_sparsity(ek, ev, d=D, target_ratio=target, exact_fraction=exact_fraction)
        assert len(sk) == len(sv) == L
        assert all(isinstance(v, int) and 1 <= v <= S for v in sk + sv)
        ratio = compression_ratio(sk, sv, d=D, exact_fraction=exact_fraction)
        assert ratio <= target + 1e-12
        full = all(v == S for v in sk + sv)
        assert full or ratio > target - atom - 1e-12


def test_protected_tokens_are_paid_for_in_atoms():
    """Protected tokens are coded and exact: at the same target they cost exactly their
    fp16 share in atoms, and the ratio counts them."""
    ek, ev = _curves(2)
    atom = 0.9 * 3 / (L * 4 * D)
    plain = choose_sparsity(ek, ev, d=D, target_ratio=0.3, exact_fraction=0.1)
    sk, sv = choose_sparsity(
        ek, ev, d=D, target_ratio=0.3, exact_fraction=0.1, protected_fraction=0.05
    )
    ratio = compression_ratio(sk, sv, d=D, exact_fraction=0.1, protected_fraction=0.05)
    assert 0.3 - atom - 1e-12 < ratio <= 0.3 + 1e-12
    spent = sum(sk) + sum(sv) - sum(plain[0]) - sum(plain[1])
    assert abs(spent * atom + 0.05) <= atom + 1e-12  # 0.05 of fp16 less for the codes
    with pytest.raises(ValueError, match="protected_fraction must be >= 0"):
        choose_sparsity(ek, ev, d=D, target_ratio=0.3, protected_fraction=-0.1)


def test_monotone_in_target():
    ek, ev = _curves(1)
    prev = None
    for target in torch.linspace(0.03, 0.8, 40).tolist():
        cur = choose_sparsity(ek, ev, d=D, target_ratio=target)
        if prev is not None:
            assert all(a >= b for a, b in zip(cur[0] + cur[1], prev[0] + prev[1], strict=True))
        prev = cur
    assert prev == ([S] * L, [S] * L)


def test_greedy_follows_the_largest_error_drop():
    ek = torch.full((3, 4), 0.5)
    ev = torch.full((3, 4), 0.5)
    ek[1] = torch.tensor([0.9, 0.3, 0.2, 0.19])  # layer 1 keys: big drops first
    ev[2] = torch.tensor([0.6, 0.45, 0.44, 0.43])
    # d = 8: one atom costs 3 / (3 * 32) of the ratio; s_min everywhere costs 6 atoms.
    picks = {
        7: ([1, 2, 1], [1, 1, 1]),  # drop 0.6
        8: ([1, 2, 1], [1, 1, 2]),  # then 0.15 beats 0.1
        9: ([1, 3, 1], [1, 1, 2]),  # then 0.1 beats 0.01
    }
    for atoms, expected in picks.items():
        assert choose_sparsity(ek, ev, d=8, target_ratio=atoms * 3 / 96) == expected
    # Flat curves get nothing even when the budget allows: no error drop, no atom.
    sk, sv = choose_sparsity(ek, ev, d=8, target_ratio=1.0)
    assert (sk, sv) == ([1, 4, 1], [1, 1, 4])


def test_max_error_mode():
    ek = torch.tensor([[0.5, 0.3, 0.2, 0.1], [0.9, 0.8, 0.7, 0.6]])
    ev = torch.tensor([[0.25, 0.2, 0.1, 0.05], [0.3, 0.25, 0.2, 0.15]])
    assert choose_sparsity(ek, ev, d=8, max_error=0.25) == ([3, 4], [1, 2])
    assert choose_sparsity(ek, ev, d=8, max_error=0.25, s_min=2) == ([3, 4], [2, 2])
    assert choose_sparsity(ek, ev, d=8, max_error=0.25, s_max=3) == ([3, 3], [1, 2])
    # Tighter error needs more atoms, never fewer.
    loose = choose_sparsity(ek, ev, d=8, max_error=0.3)
    tight = choose_sparsity(ek, ev, d=8, max_error=0.1)
    assert all(t >= lo for t, lo in zip(tight[0] + tight[1], loose[0] + loose[1], strict=True))


def test_errors_name_the_numbers():
    ek, ev = _curves()
    with pytest.raises(ValueError, match="exactly one of target_ratio and max_error"):
        choose_sparsity(ek, ev, d=D)
    with pytest.raises(ValueError, match="exactly one of target_ratio and max_error"):
        choose_sparsity(ek, ev, d=D, target_ratio=0.2, max_error=0.1)
    # s_min = 2 everywhere: 6 layers * 4 atoms * 3 bytes / (6 * 256) = 0.0469.
    with pytest.raises(
        ValueError, match=r"target_ratio=0\.04 is unreachable: s_min=2 .* 6 layers .* 0\.0469"
    ):
        choose_sparsity(ek, ev, d=D, target_ratio=0.04, s_min=2)
    with pytest.raises(ValueError, match=r"unreachable.*0\.5234.*exact_fraction=0\.5"):
        choose_sparsity(ek, ev, d=D, target_ratio=0.5, s_min=2, exact_fraction=0.5)
    with pytest.raises(
        ValueError, match=r"s_max <= 16 \(the curves' length\), got s_min=1, s_max=17"
    ):
        choose_sparsity(ek, ev, d=D, max_error=0.1, s_max=17)
    with pytest.raises(ValueError, match=r"exact_fraction must be in \[0, 1\), got 1"):
        choose_sparsity(ek, ev, d=D, target_ratio=0.9, exact_fraction=1.0)
    with pytest.raises(ValueError, match=r"both be \(L, s_max\).*\(6, 16\) and \(6, 15\)"):
        choose_sparsity(ek, ev[:, :15], d=D, target_ratio=0.2)


def test_key_weight_moves_atoms_to_keys_at_the_same_budget():
    ek, ev = _curves()
    budgets = {}
    for w in (1.0, 3.0, 10.0):
        sk, sv = choose_sparsity(ek, ev, d=D, target_ratio=0.2, key_weight=w)
        budgets[w] = (sum(sk), sum(sv))
    assert sum(budgets[1.0]) == sum(budgets[3.0]) == sum(budgets[10.0])
    assert budgets[1.0][0] < budgets[3.0][0] < budgets[10.0][0]
    # error mode: the key bound is max_error / key_weight
    tight, _ = choose_sparsity(ek, ev, d=D, max_error=0.2, key_weight=2.0)
    assert tight == choose_sparsity(ek, ek, d=D, max_error=0.1)[0]
    with pytest.raises(ValueError, match="key_weight"):
        choose_sparsity(ek, ev, d=D, target_ratio=0.2, key_weight=0)
