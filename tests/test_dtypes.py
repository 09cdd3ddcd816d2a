"""Exact sizes for every dtype torch defines: the regression test of vLLM's `finfo(dtype).bits` crash."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from weightlift.dtypes import dtype_size, nbytes, storage_span

ALL_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


def _make(dtype: torch.dtype, n: int) -> torch.Tensor:
    with warnings.catch_warnings():  # complex32 is experimental, legacy quantized dtypes deprecated
        warnings.simplefilter("ignore", UserWarning)
        return torch.empty(n, dtype=dtype)


def test_enumerates_the_dtypes_the_issue_names():
    names = {str(d).removeprefix("torch.") for d in ALL_DTYPES}
    for expected in [
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
        "uint4",
        "int4",
        "uint16",
        "uint32",
        "uint64",
        "bits8",
        "qint8",
        "quint4x2",
        "complex64",
        "bool",
        "bfloat16",
    ]:
        assert expected in names  # fmt: skip
    assert len(ALL_DTYPES) >= 40


def _bytes_from_name(name: str) -> int:
    """Independent of torch's own size: the bits its name says (``float8_e4m3fn`` 8, ``complex64`` 64, packed
    ``quint4x2``/``bits1x8``/``float4_e2m1fn_x2`` bits times values), at least one byte (``int3``: one byte each)."""
    if name == "bool":
        return 1
    m = re.match(r"[a-z]+?(\d+)(?:x(\d+))?", name)
    bits = int(m[1]) * int(m[2] or 1) * (2 if name.endswith("_x2") else 1)
    return max(1, bits // 8)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_size_matches_storage(dtype):
    t = _make(dtype, 12)
    assert dtype_size(dtype) == _bytes_from_name(str(dtype).removeprefix("torch.")) == t.element_size()
    assert nbytes(t) == t.untyped_storage().nbytes()
    if not t.is_quantized:
        assert nbytes(t) == 12 * dtype_size(dtype)
        assert nbytes(t[3:7]) == 4 * dtype_size(dtype)


def test_packed_quantized_dtypes_count_storage_not_elements():
    t = torch.empty(12, dtype=torch.quint4x2)
    assert nbytes(t) == 6  # two 4-bit values per byte
    assert nbytes(torch.empty(12, dtype=torch.quint2x4)) == 3


def test_span_of_views_and_strides():
    base = torch.zeros(10, 8, dtype=torch.float16)
    assert storage_span(base) == (0, 160)
    assert storage_span(base[2:4]) == (32, 64)
    assert storage_span(base.t()) == (0, 160)
    assert storage_span(base[:, 1]) == (2, 2 * (9 * 8 + 1) + 2)
    assert nbytes(base[:0]) == 0


def test_dtype_size_rejects_non_dtypes():
    with pytest.raises(TypeError):
        dtype_size("float32")
