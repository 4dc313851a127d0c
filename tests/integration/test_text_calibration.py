"""Text-only models calibrate on text (``vlmptq/calib/text.py``): windows of ``max_seq_len`` tokens from a
.txt file, a folder of them, .jsonl / .json records or a Hugging Face dataset, through the CLI and the
API, with GPTQ, GPTAQ and VLM-PTQ; the built-in image set and bad sources fail before any weights load."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import vlmptq
from vlmptq.calib import CalibConfig
from vlmptq.calib.text import load_text_calibration
from vlmptq.config import make_config
from vlmptq.errors import CalibrationDataError, ConfigError

# Public-domain-style prose written for the test: enough distinct tokens for several windows.
PARAGRAPHS = [
    f"Paragraph {i}: the river ran past the mill for {i + 3} miles, and the miller counted {7 * i} sacks of "
    f"grain before the winter of year {1800 + i}. Nobody in the village remembered a colder season."
    for i in range(40)
]


@pytest.fixture(scope="module")
def tiny_llama(tiny_qwen2_vl, tmp_path_factory):
    """A tiny random Llama with the Qwen2 tokenizer (the embeddings cover its whole vocabulary)."""
    from tests.support.tiny_families import build_tiny_text_lm

    return build_tiny_text_lm("llama", tmp_path_factory.mktemp("text-only") / "llama", tiny_qwen2_vl)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(PARAGRAPHS))
    return path


def _tokenizer(src):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)


def test_windows_are_cut_from_the_token_stream(tiny_llama, corpus):
    tok = _tokenizer(tiny_llama)
    samples = load_text_calibration(CalibConfig(source=str(corpus), num_samples=4, max_seq_len=64), tok)
    stream = tok(corpus.read_text() + "\n\n", add_special_tokens=False).input_ids
    assert len(stream) > 8 * 64  # more windows than drawn: the seed chooses
    assert len(samples) == 4
    for s in samples:
        ids = s.inputs["input_ids"][0].tolist()
        assert len(ids) == 64 and s.inputs["attention_mask"].shape == (1, 64)
        assert not s.vision_mask.any() and s.text_mask.all()
        start = int(s.sample_id.split("[")[1].split(":")[0])
        assert ids == stream[start:start + 64]  # (Qwen2's tokenizer adds no BOS)
    other = load_text_calibration(CalibConfig(source=str(corpus), num_samples=4, max_seq_len=64, seed=1), tok)
    assert [s.sample_id for s in other] != [s.sample_id for s in samples]


def test_a_large_txt_file_is_read_in_pieces_and_only_as_far_as_needed(tiny_llama, corpus, tmp_path, monkeypatch):
    """Pieces cut at line breaks tokenize to the whole file's tokens, and reading stops once the stream holds
    enough: a corpus whose tail is not UTF-8 still calibrates when that tail is never reached."""
    import vlmptq.calib.text as text

    tok = _tokenizer(tiny_llama)
    config = CalibConfig(source=str(corpus), num_samples=16, max_seq_len=64)  # 4 x 16 windows: more than it holds
    whole = load_text_calibration(config, tok)
    monkeypatch.setattr(text, "CHUNK_CHARS", 150)
    assert "".join(text._pieces(corpus)) == corpus.read_text() + "\n\n"
    assert len(list(text._pieces(corpus))) > 20
    pieced = load_text_calibration(config, tok)
    assert [s.sample_id for s in pieced] == [s.sample_id for s in whole]
    assert all(torch.equal(a.inputs["input_ids"], b.inputs["input_ids"]) for a, b in zip(pieced, whole))
    big = tmp_path / "big.txt"
    big.write_bytes(("\n\n".join(PARAGRAPHS * 3)).encode() + b"\n\xff\xfe not UTF-8")
    assert len(load_text_calibration(CalibConfig(source=str(big), num_samples=2, max_seq_len=64), tok)) == 2
    with pytest.raises(CalibrationDataError, match="it must be a UTF-8 text file"):
        load_text_calibration(CalibConfig(source=str(big), num_samples=200, max_seq_len=64), tok)


def test_every_text_source_form(tiny_llama, tmp_path):
    tok = _tokenizer(tiny_llama)
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(0, 40, 10):
        (folder / f"part{i}.txt").write_text("\n\n".join(PARAGRAPHS[i:i + 10]))
    (tmp_path / "recs.jsonl").write_text("\n".join(json.dumps({"body": p}) for p in PARAGRAPHS))
    (tmp_path / "recs.json").write_text(json.dumps([{"text": p} for p in PARAGRAPHS]))
    import datasets

    datasets.Dataset.from_dict({"text": PARAGRAPHS}).save_to_disk(str(tmp_path / "ds"))
    for config in (CalibConfig(source=str(folder), num_samples=3, max_seq_len=32),
                   CalibConfig(source=str(tmp_path / "recs.jsonl"), text_column="body", num_samples=3, max_seq_len=32),
                   CalibConfig(source=str(tmp_path / "recs.json"), num_samples=3, max_seq_len=32),
                   CalibConfig(source=str(tmp_path / "ds"), num_samples=3, max_seq_len=32)):
        samples = load_text_calibration(config, tok)
        assert [s.num_tokens for s in samples] == [32, 32, 32], config.source


def test_bad_text_sources_say_what_to_do(tiny_llama, tmp_path, corpus, caplog):
    tok = _tokenizer(tiny_llama)
    (tmp_path / "recs.jsonl").write_text(json.dumps({"text": PARAGRAPHS[0]}) + "\n" + json.dumps({"txt": "x"}) +
                                         "\n" + "\n".join(json.dumps({"text": p}) for p in PARAGRAPHS[1:]))
    # records are read (in a seeded order) until there are tokens enough: ask for more than all of them hold
    jsonl = CalibConfig(source=str(tmp_path / "recs.jsonl"), num_samples=500, max_seq_len=32)
    with pytest.raises(CalibrationDataError, match=r"recs.jsonl:2: has no 'text' key \(its keys: \['txt'\]\)"):
        load_text_calibration(jsonl, tok)
    with caplog.at_level(logging.WARNING):
        skipped = load_text_calibration(CalibConfig(source=jsonl.source, num_samples=500, max_seq_len=32,
                                                    on_bad_sample="skip"), tok)
    assert 10 < len(skipped) < 500 and "skipped 1 bad calibration record" in caplog.text
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.png").write_bytes(b"")
    with pytest.raises(CalibrationDataError, match="a folder without .txt files"):
        load_text_calibration(CalibConfig(source=str(tmp_path / "empty")), tok)
    (tmp_path / "short.txt").write_text("Too short.")
    with pytest.raises(CalibrationDataError, match=r"holds \d+ tokens of text; give at least a few thousand"):
        load_text_calibration(CalibConfig(source=str(tmp_path / "short.txt")), tok)
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(CalibrationDataError, match="neither .txt, .jsonl nor .json"):
        load_text_calibration(CalibConfig(source=str(tmp_path / "notes.md")), tok)
    with caplog.at_level(logging.INFO):  # fewer windows than asked for: all of them, logged
        few = load_text_calibration(CalibConfig(source=str(corpus), num_samples=1000, max_seq_len=512), tok)
    assert 1 <= len(few) < 1000 and "windows of 512 tokens (num_samples=1000)" in caplog.text


@pytest.mark.parametrize("method", ["gptq", "gptaq", "vlmptq"])
def test_text_only_model_quantized_with_calibration(method, tiny_llama, corpus, tmp_path):
    config = make_config(method=method, bits=4, group_size=32, device="cpu",
                         calib=CalibConfig(source=str(corpus), num_samples=4, max_seq_len=64))
    report = vlmptq.quantize(tiny_llama, tmp_path / "out", config)
    assert len(report.records) == 14 and report.num_calibration_samples == 4
    assert all(r.rel_error is not None and 0 < r.rel_error < 0.1 for r in report.records)
    rtn = vlmptq.quantize(tiny_llama, tmp_path / "rtn", make_config(method="rtn", bits=4, group_size=32))
    assert len(rtn.records) == 14


def test_text_only_model_on_the_builtin_image_set_or_a_missing_file_fails_before_loading(tiny_llama, tmp_path,
                                                                                       monkeypatch, capsys):
    import vlmptq.api as api

    monkeypatch.setattr(api, "load_model", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(CalibrationDataError, match="is a text-only model and the built-in calibration set holds "
                                                   "image-caption pairs; calibrate it on text: --calib a .txt file"):
        vlmptq.quantize(tiny_llama, tmp_path / "out", make_config(method="gptq", group_size=32))
    with pytest.raises(CalibrationDataError, match=r"'.*gone\.txt' does not exist; check the path"):
        vlmptq.quantize(tiny_llama, tmp_path / "out", make_config(
            method="gptq", group_size=32, calib=CalibConfig(source=str(tmp_path / "gone.txt"))))
    from vlmptq.cli import main

    assert main(["quantize", "--model", str(tiny_llama), "--out", str(tmp_path / "o"), "--method", "gptq",
                 "--group-size", "32"]) == 2
    assert "text-only model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_a_tokenizer_that_is_not_the_models_is_named(tiny_llama, corpus, tmp_path):
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small-vocab"
    shutil.copytree(tiny_llama, small)
    config = LlamaConfig.from_pretrained(small)
    config.vocab_size = 64
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(small)
    with pytest.raises(ConfigError, match=r"token id \d+, but the model's input embeddings hold 64 rows"):
        vlmptq.quantize(small, tmp_path / "out", make_config(
            method="gptq", bits=4, group_size=32, calib=CalibConfig(source=str(corpus), num_samples=2, max_seq_len=64)))
