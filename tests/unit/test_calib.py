"""Calibration sources end to end with real VLM processors: formats, masks, sampling."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch
from PIL import Image

from vlmptq.calib import CalibConfig, load_calibration
from vlmptq.calib.records import to_rgb

from tests.support.tiny_families import idefics3_processor, internvl_processor, llava_processor


def _photo(path, size=(96, 72), mode="RGB", seed=0):
    """A small noisy image (not flat, so it is a plausible photo for the processor)."""
    gen = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = torch.randint(0, 256, (size[1], size[0], channels), generator=gen, dtype=torch.uint8)
    img = Image.fromarray(pixels.squeeze(-1).numpy(), mode=mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return img


def _processor(path):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(path)
    return AutoProcessor.from_pretrained(path), [config.image_token_id, config.video_token_id]


@pytest.fixture(scope="module")
def qwen2(tiny_qwen2_vl):
    return _processor(tiny_qwen2_vl)


@pytest.fixture(scope="module")
def qwen25(tiny_qwen2_5_vl):
    return _processor(tiny_qwen2_5_vl)


def _check_masks(sample, processor, image_token_id):
    ids = sample.inputs["input_ids"]
    assert ids.shape[0] == 1 and ids.dim() == 2
    t = ids.shape[1]
    assert sample.vision_mask.shape == sample.text_mask.shape == (t,)
    assert sample.vision_mask.dtype == sample.text_mask.dtype == torch.bool
    # One placeholder per merged 2x2 patch group: exactly where the vision features are inserted.
    merge = processor.image_processor.merge_size
    assert int(sample.vision_mask.sum()) == int(sample.inputs["image_grid_thw"].prod()) // merge**2
    assert torch.equal(sample.vision_mask, ids[0] == image_token_id)
    real = sample.inputs["attention_mask"][0].bool()
    assert torch.equal(sample.text_mask, real & ~sample.vision_mask)
    assert not bool((sample.text_mask & sample.vision_mask).any())


def test_directory_source_masks_and_model_forward(tmp_path, qwen2, tiny_qwen2_vl, caplog):
    processor, vision_ids = qwen2
    _photo(tmp_path / "photos" / "cat.jpg")
    (tmp_path / "photos" / "cat.txt").write_text("A tabby cat on a sofa.\n")
    _photo(tmp_path / "dog.png", mode="RGBA", seed=1)
    (tmp_path / "dog.txt").write_text("A dog running on a beach.")
    _photo(tmp_path / "gray.png", mode="L", seed=2)
    (tmp_path / "captions.jsonl").write_text(json.dumps(
        {"image": "gray.png", "text": "A grey test pattern.", "prompt": "What pattern is this?"}))
    caplog.set_level(logging.INFO, logger="vlmptq.calib")

    samples = load_calibration(CalibConfig(source=str(tmp_path)), processor, vision_ids)

    assert "fewer than num_samples=128" in caplog.text
    by_id = {s.sample_id: s for s in samples}
    assert set(by_id) == {"photos/cat.jpg", "dog.png", "gray.png"}
    for sample in samples:
        _check_masks(sample, processor, vision_ids[0])
    decoded = processor.tokenizer.decode(by_id["gray.png"].inputs["input_ids"][0])
    assert "What pattern is this?" in decoded and "A grey test pattern." in decoded
    decoded = processor.tokenizer.decode(by_id["photos/cat.jpg"].inputs["input_ids"][0])
    assert "Describe this image." in decoded and "A tabby cat on a sofa." in decoded
    # The caption is the assistant turn, after the image and the prompt.
    assert decoded.index("<|image_pad|>") < decoded.index("Describe") < decoded.index("tabby")

    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2_vl).eval()
    with torch.no_grad():
        out = model(**by_id["dog.png"].inputs)
    assert out.logits.shape[:2] == by_id["dog.png"].inputs["input_ids"].shape


def test_transparent_pixels_are_flattened_onto_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (255, 0, 0)


def test_jsonl_source_paths_prompts_and_columns(tmp_path, qwen25):
    processor, vision_ids = qwen25
    _photo(tmp_path / "img" / "a.jpg")
    _photo(tmp_path / "elsewhere" / "b.png", seed=3)
    lines = [
        {"img": "img/a.jpg", "caption": ["First caption.", "Alternative."]},  # relative path
        {"img": str(tmp_path / "elsewhere" / "b.png"), "caption": "Second caption.",
         "prompt": "What colour is it?"},  # absolute
    ]
    (tmp_path / "data").mkdir()
    jsonl = tmp_path / "data" / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines).replace("img/a.jpg", "../img/a.jpg"))

    cfg = CalibConfig(source=str(jsonl), image_column="img", text_column="caption",
                      default_prompt="Caption this.")
    samples = load_calibration(cfg, processor, vision_ids)

    assert [s.sample_id for s in samples] == [
        "calib.jsonl:1 (../img/a.jpg)", f"calib.jsonl:2 ({tmp_path / 'elsewhere' / 'b.png'})"]
    texts = [processor.tokenizer.decode(s.inputs["input_ids"][0]) for s in samples]
    assert "Caption this." in texts[0] and "First caption." in texts[0]
    assert "Alternative." not in texts[0]  # a list of captions (COCO style): the first one
    assert "What colour is it?" in texts[1] and "Caption this." not in texts[1]
    for sample in samples:
        _check_masks(sample, processor, vision_ids[0])


SHAREGPT4V = [  # the LLaVA / ShareGPT4V record format (paths relative to the dataset's data/ folder)
    {"id": "a", "image": "coco/train2017/a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat do you see happening in this image?"},
        {"from": "gpt", "value": "A noisy test photo."}]},
    {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    {"id": "b", "image": "sam/b.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "Another photo."},
        {"from": "human", "value": "And the colours?"}, {"from": "gpt", "value": "Mixed."}]},
]


def test_llava_conversation_records_in_a_json_list(tmp_path, qwen25, caplog):
    processor, vision_ids = qwen25
    _photo(tmp_path / "data" / "coco" / "train2017" / "a.jpg")
    _photo(tmp_path / "data" / "sam" / "b.png", seed=4)
    (tmp_path / "meta").mkdir()
    src = tmp_path / "meta" / "share-captioner.json"
    src.write_text(json.dumps(SHAREGPT4V))

    cfg = CalibConfig(source=str(src), image_root=str(tmp_path / "data"), on_bad_sample="skip", seed=0)
    with caplog.at_level(logging.WARNING):
        samples = load_calibration(cfg, processor, vision_ids)
    assert sorted(s.sample_id for s in samples) == [
        "share-captioner.json[0] (coco/train2017/a.jpg)", "share-captioner.json[2] (sam/b.png)"]
    assert "share-captioner.json[1]: is a text-only conversation (no 'image' key)" in caplog.text
    texts = {s.sample_id[len("share-captioner.json["):][0]: processor.tokenizer.decode(s.inputs["input_ids"][0])
             for s in samples}
    assert "What do you see happening in this image?" in texts["0"] and "A noisy test photo." in texts["0"]
    assert "<image>" not in texts["0"]  # the placeholder is the chat template's business
    assert "Describe this image." in texts["2"] and "Another photo." in texts["2"]  # empty prompt: default
    assert "And the colours?" not in texts["2"]  # one exchange per record
    for sample in samples:
        _check_masks(sample, processor, vision_ids[0])

    # The same records as a Hugging Face dataset with a "conversations" column (e.g. ShareGPT4V's own).
    rows = [r for r in SHAREGPT4V if "image" in r]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    ds_samples = load_calibration(CalibConfig(source=str(tmp_path / "saved"), image_root=str(tmp_path / "data")),
                                  processor, vision_ids)
    assert sorted(s.sample_id for s in ds_samples) == ["saved[0]", "saved[1]"]
    assert "Another photo." in processor.tokenizer.decode(
        next(s for s in ds_samples if s.sample_id == "saved[1]").inputs["input_ids"][0])


def _two_image_checks(sample, processor, image_token_id):
    """Both images' placeholders, each block as many as its grid has merged patches, text around them."""
    grid = sample.inputs["image_grid_thw"]
    merge = processor.image_processor.merge_size
    assert grid.shape == (2, 3) and int(sample.vision_mask.sum()) == int(grid.prod(-1).sum()) // merge**2
    ids = sample.inputs["input_ids"][0]
    assert torch.equal(sample.vision_mask, ids == image_token_id)
    assert int((ids == processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")).sum()) == 2


def test_multi_image_records(tmp_path, qwen25):
    """Several images per sample: ``"images": [...]`` (or a list under ``image``) in jsonl, LLaVA-OneVision's
    conversations with one ``<image>`` per image, and a dataset column holding a list of images. The chat
    template places one image block per image before the prompt."""
    processor, vision_ids = qwen25
    _photo(tmp_path / "a.jpg")
    _photo(tmp_path / "b.png", size=(64, 120), seed=5)
    lines = [{"images": ["a.jpg", "b.png"], "text": "Two photos.", "prompt": "Compare them."},
             {"image": ["b.png"], "text": "One photo."}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    samples = load_calibration(CalibConfig(source=str(tmp_path / "c.jsonl")), processor, vision_ids)
    assert [s.sample_id for s in samples] == ["c.jsonl:1 (a.jpg +1)", "c.jsonl:2 (b.png)"]
    _two_image_checks(samples[0], processor, vision_ids[0])
    assert "Compare them." in processor.tokenizer.decode(samples[0].inputs["input_ids"][0])
    _check_masks(samples[1], processor, vision_ids[0])

    ov = [{"id": "m", "image": ["a.jpg", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich is brighter?"}, {"from": "gpt", "value": "The first."}]}]
    (tmp_path / "ov.json").write_text(json.dumps(ov))
    [sample] = load_calibration(CalibConfig(source=str(tmp_path / "ov.json")), processor, vision_ids)
    _two_image_checks(sample, processor, vision_ids[0])
    text = processor.tokenizer.decode(sample.inputs["input_ids"][0])
    assert "Which is brighter?" in text and "<image>" not in text

    features = datasets.Features({"images": datasets.List(datasets.Image()), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"images": [[str(tmp_path / "a.jpg"), str(tmp_path / "b.png")]],
                                "text": ["Both."]}, features=features).save_to_disk(tmp_path / "ds")
    [sample] = load_calibration(CalibConfig(source=str(tmp_path / "ds")), processor, vision_ids)
    assert sample.sample_id == "ds[0]"
    _two_image_checks(sample, processor, vision_ids[0])


def _clip(folder, frames=12):
    for i in range(frames):
        _photo(folder / f"{i}.jpg", size=(84, 56), seed=100 + i)


def test_video_records(tmp_path, qwen25):
    """A clip as a folder of frames (natural order) or a list of frame files, alone or after an image: at most
    ``video_frames`` frames, evenly subsampled, their rate scaled to match, so Qwen2.5-VL times the temporal
    patches as at inference (``second_per_grid_ts`` = 2 frames / fps); every video placeholder is a vision token."""
    processor, vision_ids = qwen25
    _clip(tmp_path / "clip")
    _photo(tmp_path / "a.jpg")
    lines = [{"video": "clip", "fps": 3, "text": "Things move."},
             {"image": "a.jpg", "video": [f"clip/{i}.jpg" for i in range(4)], "text": "Both.", "prompt": "What?"}]
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    clip, both = load_calibration(CalibConfig(source=str(tmp_path / "v.jsonl")), processor, vision_ids)
    assert (clip.sample_id, both.sample_id) == ("v.jsonl:1 (clip)", "v.jsonl:2 (a.jpg +1)")
    merge, video_id = processor.image_processor.merge_size, processor.video_token_id
    for sample, frames in ((clip, 8), (both, 4)):  # 12 frames at 3 fps -> 8 at 2 fps; 4 at the default 2 fps
        grid = sample.inputs["video_grid_thw"]
        assert grid.shape == (1, 3) and int(grid[0, 0]) == frames // 2
        assert sample.inputs["second_per_grid_ts"].tolist() == [1.0]
        ids = sample.inputs["input_ids"][0]
        assert int((ids == video_id).sum()) == int(grid.prod()) // merge**2
    assert "image_grid_thw" not in clip.inputs and int(both.inputs["image_grid_thw"].shape[0]) == 1
    assert int(both.vision_mask.sum()) == sum(int(g.prod()) for k in ("image_grid_thw", "video_grid_thw")
                                              for g in both.inputs[k]) // merge**2
    assert "What?" in processor.tokenizer.decode(both.inputs["input_ids"][0])

    cfg = CalibConfig(source=str(tmp_path / "v.jsonl"), video_frames=3, num_samples=1)
    [short] = load_calibration(cfg, processor, vision_ids)
    assert int(short.inputs["video_grid_thw"][0, 0]) == 2  # 3 frames, padded to 2 temporal patches
    from vlmptq.errors import CalibrationDataError

    too_long = r"more than max_seq_len=64.*its clip: fewer frames \(video_frames=8\)"
    with pytest.raises(CalibrationDataError, match=too_long):
        load_calibration(CalibConfig(source=str(tmp_path / "v.jsonl"), max_seq_len=64), processor, vision_ids)


def test_video_files_are_decoded(tmp_path, qwen25):
    """An encoded clip (MPEG-4, 30 frames at 10 fps): 8 evenly spread frames decoded (first and last kept), at the
    rate they stand for (8 frames over 3 s: 2.67 fps, Qwen2.5-VL's 0.75 s per temporal patch). In .mp4 the stream
    states its frame count; in .mkv it does not, and the frames are counted first."""
    import av
    import numpy as np

    from vlmptq.calib.video import load_video

    for name in ("clip.mp4", "clip.mkv"):
        with av.open(str(tmp_path / name), "w") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 84, 56, "yuv420p"
            for i in range(30):
                frame = av.VideoFrame.from_ndarray(np.full((56, 84, 3), 8 * i, dtype=np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        video = load_video(name, None, tmp_path, "s", max_frames=8, default_fps=2.0)
        assert len(video.frames) == 8 and abs(video.fps - 8 / 3) < 1e-9, (name, len(video.frames), video.fps)
        levels = [video.frames[i].getpixel((40, 28))[0] for i in (0, -1)]
        assert abs(levels[0] - 0) <= 6 and abs(levels[1] - 8 * 29) <= 6, (name, levels)  # the first and last frame
    (tmp_path / "v.jsonl").write_text(json.dumps({"video": "clip.mp4", "text": "It brightens."}))
    processor, vision_ids = qwen25
    [sample] = load_calibration(CalibConfig(source=str(tmp_path / "v.jsonl")), processor, vision_ids)
    assert int(sample.inputs["video_grid_thw"][0, 0]) == 4
    assert sample.inputs["second_per_grid_ts"].tolist() == [pytest.approx(0.75)]


def _hf_dataset(tmp_path, n=4):
    images = [_photo(tmp_path / "src" / f"{i}.png", seed=10 + i) for i in range(n)]
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string"),
                                  "question": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"picture": images, "caption": [f"Caption {i}." for i in range(n)],
         "question": [f"Question {i}?" for i in range(n)]}, features=features)


def test_hf_dataset_saved_to_disk(tmp_path, qwen2):
    processor, vision_ids = qwen2
    ds = _hf_dataset(tmp_path)
    ds.save_to_disk(tmp_path / "single")
    datasets.DatasetDict({"train": ds.select(range(2)), "validation": ds.select(range(2, 4))}
                         ).save_to_disk(tmp_path / "dict")

    cfg = CalibConfig(source=str(tmp_path / "single"), image_column="picture",
                      text_column="caption", prompt_column="question", num_samples=2, seed=3)
    samples = load_calibration(cfg, processor, vision_ids)
    assert len(samples) == 2 and all(s.sample_id.startswith("single[") for s in samples)
    for sample in samples:
        i = int(sample.sample_id[len("single["):-1])
        text = processor.tokenizer.decode(sample.inputs["input_ids"][0])
        assert f"Question {i}?" in text and f"Caption {i}." in text
        _check_masks(sample, processor, vision_ids[0])

    val = load_calibration(CalibConfig(source=str(tmp_path / "dict"), split="validation",
                                       image_column="picture", text_column="caption"),
                           processor, vision_ids)
    assert [s.sample_id for s in val] == ["dict[0]", "dict[1]"]
    assert "Caption 2." in processor.tokenizer.decode(val[0].inputs["input_ids"][0])


def test_hf_imagefolder_directory_goes_through_load_dataset(tmp_path, qwen2):
    """Images + metadata.jsonl (Hugging Face's imagefolder layout), not our .txt-caption layout."""
    processor, vision_ids = qwen2
    for i in range(2):
        _photo(tmp_path / f"{i}.png", seed=i)
    (tmp_path / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "text": f"Folder caption {i}."}) + "\n"
        for i in range(2)))
    samples = load_calibration(CalibConfig(source=str(tmp_path)), processor, vision_ids)
    assert [s.sample_id for s in samples] == [f"{tmp_path.name}[0]", f"{tmp_path.name}[1]"]
    assert "Folder caption 1." in processor.tokenizer.decode(samples[1].inputs["input_ids"][0])


def test_sampling_is_seeded_and_deterministic(tmp_path, qwen2):
    processor, vision_ids = qwen2
    for i in range(8):
        _photo(tmp_path / f"{i}.jpg", size=(56, 56), seed=i)
        (tmp_path / f"{i}.txt").write_text(f"Picture number {i}.")

    def ids(seed):
        cfg = CalibConfig(source=str(tmp_path), num_samples=3, seed=seed)
        return [s.sample_id for s in load_calibration(cfg, processor, vision_ids)]

    first = ids(0)
    assert len(first) == 3 and len(set(first)) == 3
    assert ids(0) == first
    assert any(ids(seed) != first for seed in (1, 2, 3))


def _llava(tok_path):
    proc = llava_processor(tok_path)
    return proc, proc.tokenizer.convert_tokens_to_ids("<image>"), lambda inputs: (56 // 14) ** 2


def _idefics3(tok_path):
    proc = idefics3_processor(tok_path)
    return proc, proc.tokenizer.convert_tokens_to_ids("<image>"), lambda inputs: 4 * inputs[
        "pixel_values"].shape[1]


def _internvl(tok_path):
    proc = internvl_processor(tok_path)
    return proc, proc.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), lambda inputs: 4 * inputs[
        "pixel_values"].shape[0]


@pytest.mark.parametrize("family", [_llava, _idefics3, _internvl])
def test_other_vlm_processor_families_need_no_special_case(family, tiny_qwen2_vl):
    """Real LLaVA / Idefics3 / InternVL processor classes (tiny tokenizer, their placeholders)."""
    processor, image_token_id, expected_vision_tokens = family(tiny_qwen2_vl)
    samples = load_calibration(CalibConfig(num_samples=2), processor, [image_token_id])
    for sample in samples:
        assert sample.inputs["input_ids"].shape[0] == 1
        assert int(sample.vision_mask.sum()) == expected_vision_tokens(sample.inputs) > 0
        assert torch.equal(sample.text_mask, sample.inputs["attention_mask"][0].bool()
                           & ~sample.vision_mask)
