"""QuantizedWeight <-> checkpoint tensors: layout, round trip, and validation messages."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationScheme

from vlmptq.checkpoint.compress import check_layer_tensors, compress_weight, decompress_weight
from vlmptq.errors import CheckpointError
from vlmptq.quant.grid import quantize_rtn
from vlmptq.quant.scheme import WeightScheme


def _qw(bits=4, group=32, sym=False, n=64, k=192, dtype=torch.bfloat16, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quantize_rtn(w, WeightScheme(bits, group, sym), scale_dtype=dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [32, 64, -1])
def test_layout_and_round_trip(bits, sym, group):
    qw = _qw(bits, group, sym)
    t = compress_weight(qw)
    n, k = qw.shape
    g = 1 if group == -1 else k // group
    assert t["weight_packed"].dtype == torch.int32 and t["weight_packed"].shape == (n, -(-k * bits // 32))
    assert t["weight_scale"].dtype == torch.bfloat16 and t["weight_scale"].shape == (n, g)
    assert t["weight_shape"].dtype == torch.int64 and t["weight_shape"].tolist() == [n, k]
    if sym:
        assert "weight_zero_point" not in t
    else:
        assert t["weight_zero_point"].dtype == torch.int32
        assert t["weight_zero_point"].shape == (-(-n * bits // 32), g)
    back = decompress_weight("m", t, qw.scheme)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zero, qw.zero)
    assert torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_ct017_compressor_decodes_our_tensors(bits, sym):
    qw = _qw(bits, 64, sym, n=96)
    t = compress_weight(qw)
    scheme = QuantizationScheme(targets=["Linear"], weights=qw.scheme.to_quantization_args())
    out = PackedQuantizationCompressor.decompress(dict(t), scheme)
    assert out["weight"].dtype == torch.bfloat16
    assert torch.equal(out["weight"], qw.dequantize())


def test_padded_3bit_layout_is_read():
    qw = _qw(3, 32, False)
    t = compress_weight(qw)
    t["weight_packed"] = pack_to_int32((qw.codes.to(torch.int16) - 4).to(torch.int8), 3, packed_dim=1)
    t["weight_zero_point"] = pack_to_int32((qw.zero.to(torch.int16) - 4).to(torch.int8), 3, packed_dim=0)
    assert t["weight_packed"].shape == (64, 20)  # ceil(192 / 10), not the dense 18
    back = decompress_weight("m", t, qw.scheme)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_scale_stored_in_model_dtype_only_when_exact():
    qw = _qw(4, 32, False, dtype=torch.bfloat16)
    assert compress_weight(qw, scale_dtype=torch.float32)["weight_scale"].dtype == torch.float32
    qw32 = _qw(4, 32, False, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="not exact"):
        compress_weight(qw32, scale_dtype=torch.bfloat16)


def test_out_of_range_codes_are_refused():
    qw = _qw(2, 32, False)
    qw.codes[0, 0] = 5
    with pytest.raises(CheckpointError, match=r"\[0, 3\]"):
        compress_weight(qw)
    qw = _qw(2, 32, False)
    qw.zero[1, 0] = 4
    with pytest.raises(CheckpointError, match=r"zero points span \[\d, 4\] but 2-bit codes must lie in \[0, 3\]"):
        compress_weight(qw)


def _shapes(t):
    return {s: (tuple(v.shape), v.dtype) for s, v in t.items()}


@pytest.mark.parametrize(
    "mutate, tensor, expected",
    [
        (lambda t: t.pop("weight_zero_point"), "weight_zero_point", "missing; expected int32 [8, 6]"),
        (lambda t: t.pop("weight_packed"), "weight_packed", "missing; expected int32 [64, 24]"),
        (lambda t: t.pop("weight_scale"), "weight_scale", "missing; expected float16/bfloat16/float32 [64, 6]"),
        (lambda t: t.pop("weight_shape"), "weight_shape", "missing; expected int64 [2]"),
        (lambda t: t.update(weight_packed=t["weight_packed"][:, :-1]), "weight_packed", "int32 [64, 23]; expected int32 [64, 24]"),
        (lambda t: t.update(weight_packed=t["weight_packed"].to(torch.int64)), "weight_packed", "int64 [64, 24]; expected int32 [64, 24]"),
        (lambda t: t.update(weight_scale=t["weight_scale"][:, :3]), "weight_scale", "bfloat16 [64, 3]; expected float16/bfloat16/float32 [64, 6]"),
        (lambda t: t.update(weight_scale=t["weight_scale"].to(torch.int32)), "weight_scale", "int32 [64, 6]; expected"),
        (lambda t: t.update(weight_zero_point=t["weight_zero_point"].t()), "weight_zero_point", "int32 [6, 8]; expected int32 [8, 6]"),
        (lambda t: t.update(weight_shape=torch.tensor([64, 192, 1])), "weight_shape", "int64 [3]; expected int64 [2]"),
        (lambda t: t.update(weight_g_idx=torch.zeros(192, dtype=torch.int32)), "weight_g_idx", "not supported"),
    ],
)
def test_validation_names_tensor_found_and_expected(mutate, tensor, expected):
    qw = _qw(4, 32, False)
    t = compress_weight(qw)
    mutate(t)
    with pytest.raises(CheckpointError) as e:
        decompress_weight("model.layers.0.self_attn.k_proj", t, qw.scheme)
    msg = str(e.value)
    assert f"model.layers.0.self_attn.k_proj.{tensor}" in msg
    assert expected in msg


def test_3bit_error_lists_both_layouts():
    qw = _qw(3, 32, False)
    t = compress_weight(qw)
    t["weight_packed"] = t["weight_packed"][:, :5]
    with pytest.raises(CheckpointError, match=r"expected int32 \[64, 18\] \(or \[64, 20\], 10 values per word\)"):
        decompress_weight("m", t, qw.scheme)


def test_symmetric_checkpoint_with_zero_points_is_refused():
    qw = _qw(4, 32, True)
    t = compress_weight(qw)
    t["weight_zero_point"] = torch.zeros(8, 6, dtype=torch.int32)
    with pytest.raises(CheckpointError, match="symmetric"):
        decompress_weight("m", t, qw.scheme)


def test_group_size_that_does_not_divide_k():
    qw = _qw(4, 32, False)
    t = compress_weight(qw)
    t["weight_shape"] = torch.tensor([64, 200])
    with pytest.raises(CheckpointError, match="not divisible by group_size=32"):
        check_layer_tensors("m", _shapes(t), t["weight_shape"], qw.scheme)
