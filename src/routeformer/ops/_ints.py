"""Integer helpers for the launchers' grids and tile sizes.

Plain Python on purpose: `triton.cdiv` and `triton.next_power_of_2` are constexpr functions in recent
Triton (3.9 here), whose wrapper (argument unwrapping, an import) cost ~5 us per call on the CPU
machine, and an eager routing fwd+bwd made ~23 such calls (tests/ops/test_launch_budget.py counts the
rest of an eager step's host work).
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for 0), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
