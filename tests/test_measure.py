"""The measuring helpers the demo and the benchmarks report with."""

from __future__ import annotations

import torch

from cpfx.measure import peak_bytes


def test_peak_bytes_sees_a_transient_allocation():
    x = torch.randn(256, 256)

    def f():
        y = torch.empty(1_000_000, dtype=torch.uint8)  # freed before f returns
        del y
        return (x @ x).sum()

    peak = peak_bytes(f)
    assert 1_000_000 <= peak < 1_000_000 + 2 * x.numel() * 4 + 4096
    assert peak_bytes(lambda: None) == 0
