"""The progress store's code packing (``vlmptq/pipeline/progress.py``): lossless for every width and
for rows whose length is not a multiple of the fields per byte."""

from __future__ import annotations

import pytest
import torch

from vlmptq.pipeline.progress import pack_codes, unpack_codes


@pytest.mark.parametrize("bits,per_byte", [(2, 4), (3, 2), (4, 2), (8, 1)])
@pytest.mark.parametrize("cols", [1, 3, 192, 193])
def test_codes_round_trip(bits, per_byte, cols):
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(0, 2**bits, (5, cols), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (5, -(-cols // per_byte))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


def test_codes_of_the_wrong_shape_are_refused():
    packed = pack_codes(torch.zeros(2, 64, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"do not hold 96 4-bit codes per row"):
        unpack_codes(packed, 4, 96)
