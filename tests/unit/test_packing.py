"""Golden tests for int32 packing against compressed-tensors' own packers.

2/4/8 bit: our dense layout must be byte-identical to compressed-tensors 0.17's ``pack_to_int32``
(packed_dim 1 for weights, 0 for zero points). 3 bit: 0.17 pads (10 values per word), so dense
3-bit is checked against an independent bit-by-bit oracle here and against compressed-tensors 0.20
(subprocess, ``.venv/ct-oracle``); 0.17's padded output must still be readable.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from vlmptq.checkpoint.packing import (
    dense_width,
    pack_columns,
    pack_rows,
    padded3_width,
    unpack_columns,
    unpack_rows,
    unpack_rows_any,
)

from tests.support.ct_oracle import oracle_env



SHAPES = [(3, 64), (5, 96), (7, 33), (2, 1), (4, 190), (9, 250)]  # ragged K included


def _codes(rows: int, cols: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000 * bits + rows * cols)
    return torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.int64).to(torch.uint8)


def _signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def _bit_oracle_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent reference: write every value bit by bit into a little-endian bitstream per row."""
    rows, cols = codes.shape
    width = -(-cols * bits // 32)
    out = []
    for r in range(rows):
        stream = [0] * (width * 32)
        for i, v in enumerate(codes[r].tolist()):
            for j in range(bits):
                stream[i * bits + j] = (v >> j) & 1
        words = []
        for w in range(width):
            u = sum(bit << j for j, bit in enumerate(stream[w * 32:(w + 1) * 32]))
            words.append(u - (1 << 32) if u >= 1 << 31 else u)
        out.append(words)
    return torch.tensor(out, dtype=torch.int32)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_rows_byte_identical_to_ct017(bits, shape):
    codes = _codes(*shape, bits)
    ours = pack_rows(codes, bits)
    theirs = pack_to_int32(_signed(codes, bits), bits, packed_dim=1)
    assert ours.dtype == theirs.dtype == torch.int32
    assert ours.shape == theirs.shape == (shape[0], dense_width(shape[1], bits))
    assert torch.equal(ours, theirs)
    back = unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=1)
    assert torch.equal(back, _signed(codes, bits))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(64, 3), (33, 2), (190, 5), (1, 4)])
def test_zero_points_byte_identical_to_ct017(bits, shape):
    zeros = _codes(*shape, bits, seed=7)
    ours = pack_columns(zeros, bits)
    theirs = pack_to_int32(_signed(zeros, bits), bits, packed_dim=0)
    assert ours.shape == theirs.shape == (dense_width(shape[0], bits), shape[1])
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_columns(ours, bits, shape[0]), zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_matches_bit_oracle_and_round_trips(bits, shape):
    codes = _codes(*shape, bits, seed=3)
    packed = pack_rows(codes, bits)
    assert torch.equal(packed, _bit_oracle_pack(codes, bits))
    assert torch.equal(unpack_rows(packed, bits, shape[1]), codes)


def test_dense_3bit_values_straddle_words():
    # value 10 occupies stream bits 30..32: its low two bits end word 0, its top bit starts word 1
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b111
    packed = pack_rows(codes, 3)
    assert packed.shape == (1, 3)
    assert packed[0, 0].item() == -(1 << 31) + (1 << 30)  # bits 30 and 31 set
    assert packed[0, 1].item() == 1 and packed[0, 2].item() == 0


@pytest.mark.parametrize("shape", [(3, 64), (5, 96), (4, 190)])
def test_padded_3bit_from_ct017_is_read(shape):
    codes = _codes(*shape, 3, seed=11)
    padded = pack_to_int32(_signed(codes, 3), 3, packed_dim=1)  # 0.17: 10 values per word
    assert padded.shape == (shape[0], padded3_width(shape[1]))
    assert padded.shape[1] != dense_width(shape[1], 3)
    assert torch.equal(unpack_rows_any(padded, 3, shape[1]), codes)
    zp = pack_to_int32(_signed(codes.t().contiguous(), 3), 3, packed_dim=0)  # zero points along N
    assert torch.equal(unpack_columns(zp, 3, shape[1]), codes.t())


def test_ct017_misreads_dense_3bit():
    """The trap the SPEC warns about: 0.17 reads our dense 3-bit as padded (shape-dependent garbage)."""
    codes = _codes(4, 320, 3, seed=5)
    dense = pack_rows(codes, 3)
    wrong = unpack_from_int32(dense, 3, torch.Size((4, 320)), packed_dim=1)
    assert not torch.equal(wrong, _signed(codes, 3))


def test_unpack_rejects_width_of_neither_layout():
    with pytest.raises(ValueError, match="fits neither layout"):
        unpack_rows_any(torch.zeros(2, 9, dtype=torch.int32), 3, 64)


_CT020_PACK = r"""
import json, sys, torch
import compressed_tensors
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
cases = json.loads(sys.stdin.read())
out = {"version": compressed_tensors.__version__, "packed": []}
for c in cases:
    v = torch.tensor(c["signed"], dtype=torch.int8)
    out["packed"].append(pack_to_int32(v, c["bits"], packed_dim=c["dim"]).tolist())
print(json.dumps(out))
"""


def test_dense_byte_identical_to_ct020_all_bits():
    env = oracle_env()
    cases, ours = [], []
    for bits in (2, 3, 4, 8):
        for shape in [(3, 64), (7, 33), (4, 190)]:
            codes = _codes(*shape, bits, seed=13)
            cases.append({"signed": _signed(codes, bits).tolist(), "bits": bits, "dim": 1})
            ours.append(pack_rows(codes, bits))
            cases.append({"signed": _signed(codes, bits).tolist(), "bits": bits, "dim": 0})
            ours.append(pack_columns(codes, bits))
    res = subprocess.run([sys.executable, "-c", _CT020_PACK], input=json.dumps(cases), env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["version"] == "0.20.0"
    for mine, theirs in zip(ours, out["packed"]):
        assert torch.equal(mine, torch.tensor(theirs, dtype=torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_in_row_blocks_is_the_same(bits, monkeypatch):
    """Rows are packed in blocks (bounded working memory): blocks of 1 and 3 rows give the words one
    block gives, and unpack back."""
    import vlmptq.checkpoint.packing as packing

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, 100), generator=g, dtype=torch.uint8)
    whole = packing.pack_rows(codes, bits)
    for values in (100, 300):  # one row, three rows per block
        monkeypatch.setattr(packing, "CHUNK_VALUES", values)
        assert torch.equal(packing.pack_rows(codes, bits), whole)
        assert torch.equal(packing.unpack_rows(whole, bits, 100), codes)
    assert packing.pack_rows(codes[:0], bits).shape == (0, packing.dense_width(100, bits))
