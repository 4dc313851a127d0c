"""The built-in calibration set: shipped files, licenses, the seeded crop/flip/prompt stream."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlmptq.calib import BUILTIN_HOLDOUT, BUILTIN_PROMPTS, CalibConfig, load_calibration
from vlmptq.calib.builtin import BUILTIN_DIR, builtin_photos, builtin_variant
from vlmptq.data.make_builtin_calib import MAX_SIDE, PHOTOS


def test_shipped_folder_is_small_licensed_and_matches_the_generator():
    files = sorted(p.name for p in BUILTIN_DIR.iterdir())
    jpgs = [f for f in files if f.endswith(".jpg")]
    assert set(files) == set(jpgs) | {"captions.jsonl", "LICENSES.md"}
    assert sum((BUILTIN_DIR / f).stat().st_size for f in files) < 1_500_000
    photos = builtin_photos()
    assert sorted(p.file for p in photos) == jpgs
    licenses = (BUILTIN_DIR / "LICENSES.md").read_text()
    for photo, spec in zip(photos, PHOTOS, strict=True):
        assert photo.file == f"{spec.name}.jpg" and photo.caption == spec.caption
        assert photo.flip == spec.flip
        assert f"| {photo.file} |" in licenses and spec.license in licenses
        with Image.open(BUILTIN_DIR / photo.file) as img:
            assert img.format == "JPEG" and max(img.size) <= MAX_SIDE
    assert not {p.name for p in PHOTOS} & set(BUILTIN_HOLDOUT)


def test_stream_is_deterministic_varied_and_never_mirrors_text():
    photos = builtin_photos()
    n = len(photos)
    stream = [builtin_variant(photos, k, seed=0) for k in range(128)]
    assert stream == [builtin_variant(photos, k, seed=0) for k in range(128)]
    assert stream != [builtin_variant(photos, k, seed=1) for k in range(128)]
    # First cycle: every photo once, whole; later cycles: crops keeping >= 60% of each side.
    assert sorted(v.photo.file for v in stream[:n]) == sorted(p.file for p in photos)
    assert all(v.box is None and not v.flip for v in stream[:n])
    for v in stream[n:]:
        left, top, right, bottom = v.box
        assert 0 <= left < right <= 1 and 0 <= top < bottom <= 1
        assert right - left >= 0.6 and bottom - top >= 0.6
    assert not any(v.flip for v in stream if not v.photo.flip)
    assert any(v.flip for v in stream)
    prompts = {v.prompt for v in stream}
    assert len(prompts) >= 8 and prompts <= set(BUILTIN_PROMPTS)
    assert len({(v.photo.file, v.box, v.flip) for v in stream}) == 128


@pytest.fixture(scope="module")
def qwen25(tiny_qwen2_5_vl):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_qwen2_5_vl)
    return AutoProcessor.from_pretrained(tiny_qwen2_5_vl), [config.image_token_id]


def test_builtin_samples_through_a_real_processor(qwen25):
    processor, ids = qwen25
    first = load_calibration(CalibConfig(num_samples=16, seed=5), processor, ids)
    again = load_calibration(CalibConfig(num_samples=16, seed=5), processor, ids)
    assert len(first) == 16 and len({s.sample_id for s in first}) == 16
    assert [s.sample_id for s in first] == [s.sample_id for s in again]
    for a, b in zip(first, again):
        assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])
        assert torch.equal(a.inputs["pixel_values"], b.inputs["pixel_values"])
        assert int(a.vision_mask.sum()) > 0 and int(a.text_mask.sum()) > 0
    captions = {json.loads(line)["text"] for line in
                (BUILTIN_DIR / "captions.jsonl").read_text().splitlines()}
    text = processor.tokenizer.decode(first[0].inputs["input_ids"][0])
    assert any(c in text for c in captions)
    assert any(p in text for p in BUILTIN_PROMPTS)


def test_builtin_folder_is_also_a_valid_directory_source(qwen25):
    processor, ids = qwen25
    samples = load_calibration(CalibConfig(source=str(BUILTIN_DIR), num_samples=2), processor, ids)
    assert len(samples) == 2 and all(s.sample_id.endswith(".jpg") for s in samples)
