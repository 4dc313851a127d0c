"""The progress store's model fingerprint (``vlmptq/pipeline/progress.py``), which a resumed run must
match: it sees a weight file changed in place at the same size. (The store itself is tested end to end
in tests/integration/test_resume.py.)"""

from __future__ import annotations

import pytest
import torch

from vlmptq.pipeline.progress import DIGEST_WINDOW_BYTES, model_files_digest


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
