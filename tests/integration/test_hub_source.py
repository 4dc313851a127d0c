"""``--model`` takes a Hugging Face Hub id as well as a folder (``vlmptq/models/source.py``): resolved by the
real ``huggingface_hub`` through its cache, offline here (a cache laid out as ``hf download`` leaves it:
snapshot files are symlinks into ``blobs/``), and every way it can fail says what to do."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

import vlmptq
from vlmptq.calib import CalibConfig
from vlmptq.config import make_config
from vlmptq.errors import ConfigError, UnsupportedModelError
from vlmptq.plan import plan

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache under tmp_path; ``add(repo_id, folder)`` puts a model in it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def add(repo_id: str, folder, only=None):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snap = repo / "snapshots" / COMMIT
        (repo / "blobs").mkdir(parents=True)
        snap.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
        for f in sorted(folder.iterdir()):
            if only is not None and f.name not in only:
                continue
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            os.symlink(os.path.relpath(blob, snap), snap / f.name)
        return snap

    return add


def test_a_hub_id_is_quantized_from_the_cache(tiny_qwen2_vl, hub_cache, tmp_path):
    snap = hub_cache("acme/tiny-qwen2-vl", tiny_qwen2_vl)
    config = make_config(method="gptq", bits=4, group_size=32, device="cpu",
                         calib=CalibConfig(source="builtin", num_samples=2, max_seq_len=512))
    report = vlmptq.quantize("acme/tiny-qwen2-vl", tmp_path / "out", config)
    assert len(report.records) == 14
    side = [f for f in (tmp_path / "out").iterdir() if f.suffix == ".json" or f.name.startswith("tokenizer")]
    assert side and not any(f.is_symlink() for f in side)  # real files, not links into the cache
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["format"] == \
        "pack-quantized"
    # the dry run needs only the config; the plan names the model as given
    p = plan("acme/tiny-qwen2-vl", config)
    assert p.model == "acme/tiny-qwen2-vl" and p.nbytes > 0
    assert snap.is_dir()

    # a quantized checkpoint published on the Hub: inspect and compare take its id too
    hub_cache("acme/tiny-qwen2-vl-w4", tmp_path / "out")
    from vlmptq.cli import main
    from vlmptq.compare import compare

    assert main(["inspect", "acme/tiny-qwen2-vl-w4"]) == 0
    row, = compare("acme/tiny-qwen2-vl", ["acme/tiny-qwen2-vl-w4"], photos=1, questions=1, device="cpu")
    assert row.checkpoint == "acme/tiny-qwen2-vl-w4" and row.method == "gptq" and row.positions > 0


def test_what_cannot_be_resolved_says_what_to_do(hub_cache, tmp_path):
    with pytest.raises(ConfigError, match=r"--model acme/absent is not a local folder and could not be taken "
                                          r"from the Hugging Face Hub or its cache .*hub \(HF_HUB_OFFLINE is set\)"
                                          r".*hf download acme/absent"):
        vlmptq.quantize("acme/absent", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"--model \./absent does not exist; pass a local .* or a Hub id"):
        vlmptq.quantize("./absent", tmp_path / "out")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"weights\.safetensors is a file; pass the model's folder"):
        vlmptq.quantize(tmp_path / "weights.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unsupported_hub_model_fails_before_its_weights_are_fetched(hub_cache, tmp_path):
    """Only config.json is in the cache (as after a fetch of the side files): the architecture check
    runs on it, so an unsupported model costs no weight download."""
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    hub_cache("acme/bert", src)
    with pytest.raises(UnsupportedModelError, match=r"'bert' is not supported"):
        vlmptq.quantize("acme/bert", tmp_path / "out")


def test_only_top_level_side_files_and_weights_are_fetched():
    """The patterns as huggingface_hub applies them (its own filter; ``*`` crosses ``/`` in fnmatch): a
    repository's onnx/ or gguf/ folders, remote code and extras are never downloaded."""
    from huggingface_hub.utils import filter_repo_objects

    from vlmptq.models.source import SIDE_FILES, SUBFOLDERS, WEIGHTS

    files = ["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer.model", "chat_template.jinja",
             "model-00001-of-00002.safetensors", "model.safetensors.index.json", "onnx/config.json",
             "onnx/model.onnx", "gguf/model.safetensors", "modeling_custom.py", "README.md", "pytorch_model.bin"]
    got = list(filter_repo_objects(files, allow_patterns=SIDE_FILES + WEIGHTS, ignore_patterns=SUBFOLDERS))
    assert got == ["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer.model",
                   "chat_template.jinja", "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
