"""The progress store (``vlmptq/pipeline/progress.py``): its code packing is lossless for every width and
for rows whose length is not a multiple of the fields per byte; the model fingerprint a resumed run must
match sees a weight file changed in place at the same size."""

from __future__ import annotations

import pytest
import torch

from vlmptq.pipeline.progress import DIGEST_WINDOW_BYTES, model_files_digest, pack_codes, unpack_codes


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


@pytest.mark.parametrize("size", [1000, 40 * DIGEST_WINDOW_BYTES + 123])
def test_model_digest_sees_a_weight_file_changed_at_the_same_size(tmp_path, size):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    data = bytearray(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    weights = tmp_path / "model-00001-of-00001.safetensors"
    weights.write_bytes(data)
    (tmp_path / "README.md").write_text("not part of the fingerprint")
    before = model_files_digest(tmp_path)
    (tmp_path / "README.md").write_text("edited")
    assert model_files_digest(tmp_path) == before
    # another fine-tune of the same shapes: same header, (nearly) every weight byte differs
    data[100:] = bytes(b ^ 0x5A for b in data[100:])
    weights.write_bytes(data)
    assert model_files_digest(tmp_path) != before
