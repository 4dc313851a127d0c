"""Golden decompression: compressed-tensors' own code decodes our checkpoints to exactly our weights.

A tiny Qwen2-VL with RTN-quantized decoder linears is written at W2/W3/W4/W8, sym and asym, g32 and
g64. compressed-tensors 0.17 (the venv's; its 3-bit reader is the old padded layout) decodes 2/4/8
bit in-process; compressed-tensors 0.20 (``.venv/ct-oracle``, subprocess) converts every checkpoint
to a dense one with its model-free ``convert_checkpoint`` and loads the 3-bit ones with transformers'
own compressed-tensors loader.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from tests.support.checkpoints import rtn_quantize_decoder
from tests.support.ct_oracle import oracle_env
from vlmptq.checkpoint.reader import dequantize_checkpoint, inspect_checkpoint
from vlmptq.checkpoint.writer import save_quantized_checkpoint
from vlmptq.quant.scheme import WeightScheme

# Every bit width asymmetric g32 and symmetric g64, plus 3-bit asymmetric g64 (the paper's W3 case).
SCHEMES = [WeightScheme(b, g, s) for b in (2, 3, 4, 8) for g, s in ((32, False), (64, True))]
SCHEMES.append(WeightScheme(3, 64, False))
PROMPT = torch.tensor([[1, 15, 77, 300, 512, 1999, 42, 3]])


def _id(s: WeightScheme) -> str:
    return f"w{s.bits}g{s.group_size}{'s' if s.symmetric else 'a'}"


def disk_name(model_name: str) -> str:
    """Qwen2-VL: transformers-5 module names -> the legacy names on disk."""
    if model_name.startswith("model.language_model."):
        return "model." + model_name[len("model.language_model."):]
    if model_name.startswith("model.visual."):
        return model_name[len("model."):]
    return model_name


@pytest.fixture(scope="module")
def model(tiny_qwen2_vl):
    return AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl).eval()


@pytest.fixture(scope="module")
def written(model, tiny_qwen2_vl, tmp_path_factory):
    """scheme id -> (checkpoint dir, quantized weights) for every scheme."""
    root = tmp_path_factory.mktemp("golden")
    out = {}
    for scheme in SCHEMES:
        quantized, ignore = rtn_quantize_decoder(model, scheme)
        d = root / _id(scheme)
        save_quantized_checkpoint(model, quantized, d, scheme=scheme, ignore=ignore,
                                  source_dir=tiny_qwen2_vl, metadata={"method": "rtn"})
        out[_id(scheme)] = (d, quantized)
    return out


def _load_all(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.bits != 3], ids=_id)
def test_ct017_dequantizer_matches_ours(written, scheme):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    d, quantized = written[_id(scheme)]
    ours = dequantize_checkpoint(d)
    # 0.17's validate() rejects the q/k/v biases of quantized modules ("unconsumed keys", fixed in
    # 0.20), so run its process() step, which is the decoding itself.
    theirs = CompressedTensorsDequantizer(d, dtype=torch.bfloat16).process(_load_all(d))
    assert set(theirs) == set(ours)
    for k in ours:
        assert torch.equal(theirs[k], ours[k]), k
    for name, qw in quantized.items():
        assert torch.equal(ours[f"{disk_name(name)}.weight"], qw.dequantize()), name


_CT020 = r"""
import json, sys, torch
import compressed_tensors
from compressed_tensors.entrypoints.convert import convert_checkpoint
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
from transformers import AutoModelForImageTextToText
jobs = json.loads(sys.stdin.read())
for src, dst in jobs["convert"]:
    convert_checkpoint(src, dst, CompressedTensorsDequantizer(src, dtype=torch.bfloat16))
ids = torch.tensor(jobs["prompt"])
for src, dst in jobs["hf_load"]:
    m = AutoModelForImageTextToText.from_pretrained(src).eval()
    with torch.no_grad():
        torch.save(m(input_ids=ids).logits, dst)
print(json.dumps({"version": compressed_tensors.__version__}))
"""


@pytest.fixture(scope="module")
def ct020(written, tmp_path_factory):
    """Run compressed-tensors 0.20 once over every checkpoint: scheme id -> dense dir (+ 3-bit logits)."""
    env = oracle_env()
    root = tmp_path_factory.mktemp("ct020")
    jobs = {"convert": [], "hf_load": [], "prompt": PROMPT.tolist()}
    for sid, (d, _) in written.items():
        jobs["convert"].append((str(d), str(root / sid)))
        if sid.startswith("w3"):
            jobs["hf_load"].append((str(d), str(root / f"{sid}.logits.pt")))
    res = subprocess.run([sys.executable, "-c", _CT020], input=json.dumps(jobs), env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["version"] == "0.20.0"
    return root


@pytest.mark.parametrize("scheme", SCHEMES, ids=_id)
def test_ct020_convert_checkpoint_matches_ours(written, ct020, scheme):
    d, quantized = written[_id(scheme)]
    ours = dequantize_checkpoint(d)
    theirs = _load_all(ct020 / _id(scheme))
    assert set(theirs) == set(ours)
    for k in ours:
        assert torch.equal(theirs[k], ours[k]), k


def _fake_quant_logits(model, quantized):
    """Logits of ``model`` with our dequantized weights written in (then restored)."""
    saved = {}
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, qw in quantized.items():
            saved[name] = mods[name].weight.data.clone()
            mods[name].weight.data.copy_(qw.dequantize())
        try:
            return model(input_ids=PROMPT).logits
        finally:
            for name, w in saved.items():
                mods[name].weight.data.copy_(w)


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.bits == 3], ids=_id)
def test_transformers_with_ct020_loads_dense_3bit(model, written, ct020, scheme):
    _, quantized = written[_id(scheme)]
    theirs = torch.load(ct020 / f"{_id(scheme)}.logits.pt")
    assert torch.equal(theirs, _fake_quant_logits(model, quantized))


def test_padded_3bit_checkpoint_is_read(written, tmp_path):
    """A 3-bit checkpoint as compressed-tensors 0.17 packs it (10 values per word) reads the same."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    src, quantized = written["w3g64a"]
    dst = tmp_path / "padded"
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = _load_all(src)
    for name, qw in quantized.items():
        base = disk_name(name)
        tensors[f"{base}.weight_packed"] = pack_to_int32((qw.codes.to(torch.int16) - 4).to(torch.int8), 3, 1)
        tensors[f"{base}.weight_zero_point"] = pack_to_int32((qw.zero.to(torch.int16) - 4).to(torch.int8), 3, 0).contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})

    ours = dequantize_checkpoint(dst)
    assert all(torch.equal(ours[k], v) for k, v in dequantize_checkpoint(src).items())
    theirs = CompressedTensorsDequantizer(dst, dtype=torch.bfloat16).process(_load_all(dst))
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert inspect_checkpoint(dst).layout.startswith("padded")
    assert inspect_checkpoint(src).layout == "dense"
