"""``QuantizedWeight`` held unpacked (as solvers return it) or packed (as the pipeline keeps every finished
linear until the checkpoint is written): the same codes, scales and dequantized weight either way, the
packed rows are the checkpoint's, and misuse is refused with the shapes named."""

from __future__ import annotations

import pytest
import torch

from vlmptq.checkpoint.compress import compress_weight
from vlmptq.checkpoint.packing import dense_width, pack_rows
from vlmptq.errors import CheckpointError
from vlmptq.quant.qweight import QuantizedWeight
from vlmptq.quant.scheme import WeightScheme


def _weight(bits: int, group: int, n: int = 6, k: int = 96, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    scheme = WeightScheme(bits, group, False)
    groups = scheme.groups(k)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    zero = torch.randint(0, 2**bits, (n, groups), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, groups, generator=g) + 0.5).to(torch.bfloat16)
    return QuantizedWeight(codes, scale, zero, scheme)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,k", [(32, 96), (-1, 97)])
def test_packed_holds_the_same_weight(bits, group, k):
    qw = _weight(bits, group, k=k, seed=bits)
    packed = qw.pack()
    assert packed.is_packed and not qw.is_packed and packed.pack() is packed
    assert packed.shape == qw.shape == (6, k) and packed.numel() == 6 * k
    assert torch.equal(packed.codes, qw.codes)
    assert torch.equal(packed.dequantize(torch.float32), qw.dequantize(torch.float32))
    assert torch.equal(packed.packed_rows(), pack_rows(qw.codes, bits))  # the checkpoint's own rows
    assert packed.packed_rows().shape == (6, dense_width(k, bits))
    a, b = compress_weight(qw), compress_weight(packed)
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    moved = packed.to("cpu")
    assert moved.is_packed and torch.equal(moved.codes, qw.codes)
    assert "packed" in repr(packed) and "6x" in repr(packed)


def test_misuse_is_refused_with_the_shapes_named():
    qw = _weight(3, 32)
    with pytest.raises(ValueError, match=r"packed codes \(6, 8\) torch.int32 are not 96 3-bit codes per row"):
        QuantizedWeight.from_packed(torch.zeros(6, 8, dtype=torch.int32), 96, qw.scale, qw.zero, qw.scheme)
    with pytest.raises(ValueError, match=r"scale \(6, 3\) / zero \(5, 3\) must be \(6, 3\)"):
        QuantizedWeight.from_packed(qw.packed_rows(), 96, qw.scale, qw.zero[:5], qw.scheme)
    bad = QuantizedWeight(qw.codes.clone().fill_(9), qw.scale, qw.zero, qw.scheme)
    with pytest.raises(ValueError, match=r"codes span \[9, 9\] but 3-bit codes must lie in \[0, 7\]"):
        bad.pack()
    with pytest.raises(CheckpointError, match=r"codes span \[9, 9\] .*the solver produced out-of-range values"):
        compress_weight(bad)
