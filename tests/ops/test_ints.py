"""The launchers' integer helpers equal the Triton functions they stand in for."""
from __future__ import annotations

import triton

from routeformer.ops._ints import cdiv, next_pow2


def test_cdiv_and_next_pow2_equal_triton():
    for n in [0, 1, 2, 3, 15, 16, 17, 511, 512, 513, 65535, 65536, 65537, 2**31 + 5]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 7, 16, 64, 512):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
