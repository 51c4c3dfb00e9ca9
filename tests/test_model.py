"""Helpers of `trl_ntk._model` not covered through the kernels: the float64 dot product of parameter dicts."""

from __future__ import annotations

import math

import pytest
import torch

from trl_ntk import _model


@pytest.mark.parametrize("chunk", [5, 2**20])
def test_float64_dot_matches_an_exact_sum_of_products_in_slices_or_whole(chunk, monkeypatch):
    monkeypatch.setattr(_model, "DOT_CHUNK_ELEMENTS", chunk)
    generator = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(7, 3, generator=generator), "b": torch.randn(11, generator=generator, dtype=torch.float64)}
    b = {"w": torch.randn(7, 3, generator=generator), "b": torch.randn(11, generator=generator, dtype=torch.float64)}
    exact = math.fsum(float(x) * float(y) for n in a for x, y in zip(a[n].flatten(), b[n].flatten(), strict=True))
    result = _model.float64_dot(a, b)
    assert result.dtype == torch.float64 and result.shape == ()
    assert math.isclose(float(result), exact, rel_tol=1e-14)
