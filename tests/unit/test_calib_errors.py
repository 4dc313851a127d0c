"""Calibration errors name the sample and the fix; on_bad_sample='skip' leaves bad samples out."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
from PIL import Image

from vlmptq.calib import CalibConfig, load_calibration
from vlmptq.errors import CalibrationDataError, ConfigError


@pytest.fixture(scope="module")
def qwen2(tiny_qwen2_vl):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_qwen2_vl)
    return AutoProcessor.from_pretrained(tiny_qwen2_vl), [config.image_token_id]


def _jpeg(path, size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.linear_gradient("L").resize(size).convert("RGB").save(path, quality=90)


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def _load(qwen2, **kw):
    processor, ids = qwen2
    return load_calibration(CalibConfig(**kw), processor, ids)


@pytest.mark.parametrize("kwargs, field", [
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": True}, "num_samples"),
    ({"max_seq_len": "2048"}, "max_seq_len"),
    ({"on_bad_sample": "ignore"}, "on_bad_sample"),
    ({"source": ""}, "source"),
    ({"prompt_column": ""}, "prompt_column"),
    ({"max_image_side": 8}, "max_image_side"),
    ({"image_root": ""}, "image_root"),
])
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field) as err:
        CalibConfig(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(err.value)


def test_missing_image_file(tmp_path, qwen2):
    _jpeg(tmp_path / "a.jpg")
    src = _jsonl(tmp_path / "c.jsonl", [{"image": "a.jpg", "text": "ok"},
                                         {"image": "gone.jpg", "text": "missing"}])
    with pytest.raises(CalibrationDataError, match=r"c\.jsonl:2 \(gone\.jpg\).*does not exist"):
        _load(qwen2, source=src)


def test_images_named_by_url_are_refused_with_the_fix(tmp_path, qwen2):
    """Web-scale caption sets (CC3M, LAION) name images by URL; they were reported as files that do not exist."""
    url = "https://example.com/cat.jpg"
    match = r"names its image by URL \(https://example\.com/cat\.jpg\); download the images first"
    with pytest.raises(CalibrationDataError, match=rf"c\.jsonl:1 .*{match}"):
        _load(qwen2, source=_jsonl(tmp_path / "c.jsonl", [{"image": url, "text": "A cat."}]))
    datasets.Dataset.from_dict({"image": [url], "text": ["A cat."]}).save_to_disk(tmp_path / "web")
    with pytest.raises(CalibrationDataError, match=rf"web\[0\]: {match}"):
        _load(qwen2, source=str(tmp_path / "web"))


def test_multi_image_records_with_a_bad_entry(tmp_path, qwen2):
    """An empty image list, a non-path entry, and one unreadable image among several: each names the sample."""
    processor, vision_ids = qwen2
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    cases = [({"images": [], "text": "x"}, r"c\.jsonl:1: 'images' is an empty list"),
             ({"images": ["ok.png", 3], "text": "x"}, r"c\.jsonl:1: 'images' holds 3, not a path"),
             ({"images": ["ok.png", "cut.jpg"], "text": "x"}, r"c\.jsonl:1 \(ok\.png \+1\): cannot decode .*cut\.jpg")]
    for record, match in cases:
        (tmp_path / "c.jsonl").write_text(json.dumps(record))
        with pytest.raises(CalibrationDataError, match=match):
            load_calibration(CalibConfig(source=str(tmp_path / "c.jsonl")), processor, vision_ids)


def test_video_records_that_cannot_be_used(tmp_path, qwen2, tiny_qwen2_vl):
    """A video file that does not decode, a missing or empty frame folder, a bad fps; and a processor outside the
    Qwen-VL family, which is told to give the frames as images."""
    processor, vision_ids = qwen2
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (tmp_path / "empty").mkdir()
    (tmp_path / "frames").mkdir()
    Image.new("RGB", (56, 56), (0, 90, 0)).save(tmp_path / "frames" / "0.png")
    cases = [({"video": "clip.mp4", "text": "x"}, r"cannot decode the video .*clip\.mp4.*give its frames as a folder"),
             ({"video": "none.mp4", "text": "x"}, r"video file .*none\.mp4' does not exist"),
             ({"video": "gone", "text": "x"}, r"video folder .*gone' does not exist"),
             ({"video": "empty", "text": "x"}, r"holds no frame images"),
             ({"video": "frames", "fps": -1, "text": "x"}, r"its fps is -1, not a positive number")]
    for record, match in cases:
        (tmp_path / "v.jsonl").write_text(json.dumps(record))
        with pytest.raises(CalibrationDataError, match=match):
            load_calibration(CalibConfig(source=str(tmp_path / "v.jsonl")), processor, vision_ids)
    from tests.support.tiny_families import llava_processor

    (tmp_path / "v.jsonl").write_text(json.dumps({"video": "frames", "text": "x"}))
    with pytest.raises(ConfigError, match=r"LlavaProcessor\) placed no video token in the chat.*multi-image sample"):
        load_calibration(CalibConfig(source=str(tmp_path / "v.jsonl")), llava_processor(tiny_qwen2_vl), [0])


def test_truncated_jpeg_and_text_file_named_png(tmp_path, qwen2):
    _jpeg(tmp_path / "full.jpg", size=(200, 200))
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut" / "cut.txt").write_text("A truncated photo.")
    with pytest.raises(CalibrationDataError, match=r"cut\.jpg: cannot decode.*truncated"):
        _load(qwen2, source=str(tmp_path / "cut"))

    other = tmp_path / "fake"
    other.mkdir()
    (other / "note.png").write_text("this is not a picture")
    (other / "note.txt").write_text("A note.")
    with pytest.raises(CalibrationDataError, match=r"note\.png: cannot decode") as err:
        _load(qwen2, source=str(other))
    assert "on_bad_sample='skip'" in str(err.value)


def test_an_image_over_pils_safety_limit_says_to_downscale(tmp_path, qwen2, monkeypatch):
    """PIL refuses images over twice MAX_IMAGE_PIXELS (178.9 M) before decoding; the limit is lowered here so a
    64 x 64 photo stands in for a 15000 x 15000 scan."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _jpeg(tmp_path / "big" / "scan.jpg")
    (tmp_path / "big" / "scan.txt").write_text("A large scan.")
    with pytest.raises(CalibrationDataError, match=r"scan\.jpg: image file .* is too large to decode safely "
                                                   r"\(Image size \(4096 pixels\) exceeds limit.*\); downscale the file"):
        _load(qwen2, source=str(tmp_path / "big"))


def test_image_without_caption(tmp_path, qwen2):
    _jpeg(tmp_path / "sub" / "cat.jpg")
    with pytest.raises(CalibrationDataError, match=r"sub/cat\.jpg: has no caption.*sub/cat\.txt"):
        _load(qwen2, source=str(tmp_path))


def test_empty_sources(tmp_path, qwen2):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError, match="empty directory"):
        _load(qwen2, source=str(tmp_path / "empty"))
    with pytest.raises(CalibrationDataError, match="holds no samples"):
        _load(qwen2, source=_jsonl(tmp_path / "blank.jsonl", ["", "  "]))


def test_unknown_sources_list_the_accepted_forms(tmp_path, qwen2):
    with pytest.raises(CalibrationDataError, match="does not exist.*accepted sources"):
        _load(qwen2, source=str(tmp_path / "nope" / "calib.jsonl"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CalibrationDataError, match="not a .jsonl or .json file.*builtin"):
        _load(qwen2, source=str(tmp_path / "notes.txt"))
    with pytest.raises(CalibrationDataError, match="Hugging Face dataset.*Accepted sources"):
        _load(qwen2, source="no-such-org-vlmptq/no-such-dataset")


def test_a_model_folder_given_as_calibration_names_what_it_holds(tmp_path, tiny_qwen2_vl, qwen2):
    """A folder without images is read as a dataset; when that fails, the message gives datasets' innermost
    error (not "An error occurred while generating the dataset") and the folder's files."""
    with pytest.raises(CalibrationDataError, match=r"as a Hugging Face dataset \(CastError: Couldn't cast\)\. The "
                                                   r"folder was read as a dataset folder and holds "
                                                   r"chat_template\.jinja, config\.json, .*model\.safetensors"):
        _load(qwen2, source=str(tiny_qwen2_vl))


def test_missing_keys_and_columns(tmp_path, qwen2):
    _jpeg(tmp_path / "a.jpg")
    src = _jsonl(tmp_path / "c.jsonl", [{"image": "a.jpg", "caption": "A gradient."}])
    with pytest.raises(CalibrationDataError, match=r"c\.jsonl:1: has no 'text' key.*text_column="):
        _load(qwen2, source=src)
    assert _load(qwen2, source=src, text_column="caption")[0].sample_id == "c.jsonl:1 (a.jpg)"
    with pytest.raises(CalibrationDataError, match=r"bad\.jsonl:1: is not valid JSON"):
        _load(qwen2, source=_jsonl(tmp_path / "bad.jsonl", ['{"image": "a.jpg",']))

    datasets.Dataset.from_dict({"img": ["a.jpg"], "text": ["x"]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(CalibrationDataError, match=r"no column 'image' \(image_column\).*\['img', "
                                                   r"'text'\]"):
        _load(qwen2, source=str(tmp_path / "ds"))
    # String paths in a saved dataset resolve against the dataset directory.
    _jpeg(tmp_path / "ds" / "a.jpg")
    assert len(_load(qwen2, source=str(tmp_path / "ds"), image_column="img")) == 1
    with pytest.raises(CalibrationDataError, match="no split 'test'.*'train'"):
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": ["a.jpg"],
                                                                   "text": ["x"]})}
                             ).save_to_disk(tmp_path / "dd")
        _load(qwen2, source=str(tmp_path / "dd"), split="test")


def test_json_lists_and_conversations(tmp_path, qwen2):
    _jpeg(tmp_path / "root" / "a.jpg")
    human = {"from": "human", "value": "<image>\nWhat is this?"}

    def conv(*turns, image="a.jpg"):
        path = tmp_path / "c.json"
        path.write_text(json.dumps([{"image": image, "conversations": list(turns)}]))
        return str(path)

    root = str(tmp_path / "root")
    with pytest.raises(CalibrationDataError, match=r"c\.json\[0\]: has no user turn followed by an assistant "
                                                   r"turn \(roles: \['human'\]\).*\"conversations\" as"):
        _load(qwen2, source=conv(human), image_root=root)
    with pytest.raises(CalibrationDataError, match=r"c\.json\[0\]: has a turn .* without a string 'from' and 'value'"):
        _load(qwen2, source=conv(human, {"from": "gpt"}), image_root=root)
    with pytest.raises(CalibrationDataError, match=r"c\.json\[0\]: the first assistant turn is '  '"):
        _load(qwen2, source=conv(human, {"from": "gpt", "value": "  "}), image_root=root)
    with pytest.raises(CalibrationDataError, match=r"'conversations' is 'hello', not a list of turns"):
        _load(qwen2, source=_jsonl(tmp_path / "s.jsonl", [{"image": "a.jpg", "conversations": "hello"}]),
              image_root=root)
    ok = conv(human, {"role": "assistant", "content": "A gradient."})  # role/content spelling too
    assert _load(qwen2, source=ok, image_root=root)[0].sample_id == "c.json[0] (a.jpg)"
    # A caption key the user named (here misspelt) is not silently replaced by the conversation.
    with pytest.raises(CalibrationDataError, match=r"c\.json\[0\]: has no 'capton' key .*leave text_column at "
                                                   r"'text' to use its LLaVA 'conversations'"):
        _load(qwen2, source=ok, image_root=root, text_column="capton")
    datasets.Dataset.from_list([{"image": "a.jpg", "conversations": [human, {"from": "gpt", "value": "x"}]}]
                               ).save_to_disk(tmp_path / "conv-ds")
    with pytest.raises(CalibrationDataError, match=r"has no column 'capton' \(text_column\)"):
        _load(qwen2, source=str(tmp_path / "conv-ds"), image_root=root, text_column="capton")
    # Relative paths start from the file's folder unless image_root says otherwise.
    with pytest.raises(CalibrationDataError, match=r"c\.json\[0\] \(a\.jpg\): image file .*does not exist"):
        _load(qwen2, source=ok)
    with pytest.raises(CalibrationDataError, match=r"image_root '.*nowhere' is not a directory"):
        _load(qwen2, source=ok, image_root=str(tmp_path / "nowhere"))

    (tmp_path / "obj.json").write_text(json.dumps({"data": []}))
    with pytest.raises(CalibrationDataError, match=r"holds a JSON dict, not a list of records"):
        _load(qwen2, source=str(tmp_path / "obj.json"))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(CalibrationDataError, match=r"broken\.json' is not valid JSON .*use \.jsonl"):
        _load(qwen2, source=str(tmp_path / "broken.json"))
    (tmp_path / "list.json").write_text(json.dumps([3]))
    with pytest.raises(CalibrationDataError, match=r"list\.json\[0\]: is a JSON int, not an object"):
        _load(qwen2, source=str(tmp_path / "list.json"))


def test_too_long_errors_by_default_and_skip_replaces_and_counts(tmp_path, qwen2, caplog):
    rows = []
    for i in range(6):
        _jpeg(tmp_path / f"{i}.jpg", size=(56, 56))
        text = "Short." if i % 2 else "A very long caption that goes on. " * 20
        rows.append({"image": f"{i}.jpg", "text": text})
    src = _jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(CalibrationDataError, match=r"c\.jsonl:1 \(0\.jpg\): has \d+ tokens .*"
                                                   r"more than max_seq_len=64.*raise max_seq_len"):
        _load(qwen2, source=src, max_seq_len=64, num_samples=6)

    caplog.set_level(logging.WARNING, logger="vlmptq.calib")
    got = _load(qwen2, source=src, max_seq_len=64, num_samples=2, on_bad_sample="skip")
    assert len(got) == 2 and all(s.num_tokens <= 64 for s in got)  # replaced from the rest
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert skipped and all("max_seq_len=64" in m for m in skipped)
    assert f"skipped {len(skipped)} bad calibration sample(s)" in caplog.text

    with pytest.raises(CalibrationDataError, match="every calibration sample tried .* was bad"):
        _load(qwen2, source=src, max_seq_len=16, on_bad_sample="skip")


def test_wrong_vision_token_ids(tmp_path, qwen2):
    processor, _ = qwen2
    _jpeg(tmp_path / "a.jpg")
    src = _jsonl(tmp_path / "c.jsonl", [{"image": "a.jpg", "text": "x"}])
    unused = processor.tokenizer.convert_tokens_to_ids("<|box_start|>")
    with pytest.raises(ConfigError, match="no token among vision_token_ids"):
        load_calibration(CalibConfig(source=src), processor, [unused])
    with pytest.raises(ConfigError, match="non-empty collection"):
        load_calibration(CalibConfig(source=src), processor, [])
