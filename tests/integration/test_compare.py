"""``vlmptq compare`` on tiny random Qwen2-VL checkpoints (real model classes, real processors, real
checkpoints written by the quantizer): the KL / top-1 figures order as the schemes' precision does,
an 8-bit checkpoint is all but identical to the source, and bad input fails before any model loads."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from PIL import Image

import vlmptq
from vlmptq.calib import BUILTIN_HOLDOUT, CalibConfig
from vlmptq.checkpoint.reader import open_checkpoint
from vlmptq.compare import _dequantized, compare, format_rows
from vlmptq.config import make_config
from vlmptq.demo.evaluate import EVAL_QUESTIONS, checkpoint_modules, dequantize_into, kl_samples, reference_logprobs
from vlmptq.errors import CheckpointError, ConfigError, UnsupportedModelError
from vlmptq.models.adapters import load_model, load_model_lazily, load_processor
from vlmptq.pipeline.replay import Variant, variant_logprobs
from tests.support.tiny_families import build_tiny_family, build_tiny_text_lm

CALIB = CalibConfig(source="builtin", num_samples=3, max_seq_len=512)


@pytest.fixture(scope="module")
def checkpoints(tiny_qwen2_vl, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    out = {}
    for name, fields in {"w8": dict(method="rtn", bits=8), "w4": dict(method="gptq", bits=4),
                         "w2": dict(method="rtn", bits=2)}.items():
        out[name] = root / name
        vlmptq.quantize(tiny_qwen2_vl, out[name], make_config(group_size=32, calib=CALIB, device="cpu", **fields))
    return out


def test_kl_and_agreement_follow_the_precision(tiny_qwen2_vl, checkpoints):
    rows = compare(tiny_qwen2_vl, [checkpoints["w8"], checkpoints["w4"], checkpoints["w2"]], photos=3, questions=1,
                   device="cpu")
    w8, w4, w2 = rows
    assert [r.method for r in rows] == ["rtn", "gptq", "rtn"]
    assert [r.scheme for r in rows] == ["W8 g32 asym", "W4 g32 asym", "W2 g32 asym"]
    assert w8.prompts == 3 and w8.positions == w4.positions == w2.positions > 3 * 10
    assert 0 <= w8.kl < w4.kl < w2.kl, rows
    # 8-bit: all but the source's own predictions (measured KL 3e-4, top-1 94%: a random model's next-token
    # distributions are nearly flat, so close runners-up swap places at the smallest perturbation)
    assert w8.kl < 1e-3 and w8.top1 > 0.9, w8
    assert w2.top1 < w8.top1
    table = format_rows(rows)
    assert table.count("\n") == 4 and "| W2 g32 asym |" in table


def test_own_pairs_and_the_cli(tiny_qwen2_vl, checkpoints, tmp_path, capsys):
    Image.new("RGB", (80, 60), (20, 120, 220)).save(tmp_path / "blue.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "blue.png", "text": "A blue rectangle.",
                                                      "prompt": "What colour is this?"}) + "\n")
    (row,) = compare(tiny_qwen2_vl, [checkpoints["w4"]], data=CalibConfig(source=str(tmp_path / "pairs.jsonl")),
                     device="cpu")
    assert row.prompts == 1 and row.positions > 5 and row.kl > 0

    from vlmptq.cli import main

    assert main(["compare", "--model", str(tiny_qwen2_vl), str(checkpoints["w4"]), "--photos", "1",
                 "--questions", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| checkpoint | method | scheme | KL vs source (nats/token) | top-1 agreement |" in out
    assert f"| {checkpoints['w4']} | gptq | W4 g32 asym |" in out
    with (tmp_path / "pairs.jsonl").open("a") as f:  # a broken pair: an error naming the flag, or skipped with it
        f.write(json.dumps({"image": "gone.png", "text": "Nothing."}) + "\n")
    args = ["compare", "--model", str(tiny_qwen2_vl), str(checkpoints["w4"]), "--data", str(tmp_path / "pairs.jsonl"),
            "--device", "cpu"]
    assert main(args) == 2
    assert "gone.png' does not exist" in capsys.readouterr().err
    assert main(args + ["--skip-bad-samples"]) == 0
    assert " (1) |" in capsys.readouterr().out  # one prompt: the good pair


def test_bad_input_fails_before_loading(tiny_qwen2_vl, checkpoints, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"photos takes 1\.\.6 and questions 1\.\.4, got 7 and 1"):
        compare(tiny_qwen2_vl, [checkpoints["w4"]], photos=7, questions=1)
    with pytest.raises(ConfigError, match="at least one checkpoint"):
        compare(tiny_qwen2_vl, [])
    with pytest.raises(ConfigError, match="device 'gpu' is not a torch device"):
        compare(tiny_qwen2_vl, [checkpoints["w4"]], device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available here"):
            compare(tiny_qwen2_vl, [checkpoints["w4"]], device="cuda")
    from vlmptq.cli import main

    assert main(["compare", "--model", str(tiny_qwen2_vl), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "vlmptq: error:" in err and "config.json" in err and "Traceback" not in err
    assert main(["compare", "--model", str(tiny_qwen2_vl), str(tmp_path / "gone")]) == 2
    assert f"checkpoint {tmp_path / 'gone'} does not exist" in capsys.readouterr().err


def test_a_quantized_or_damaged_source_model_is_refused(tiny_qwen2_vl, checkpoints, tmp_path, capsys):
    """Given a quantized checkpoint as --model, transformers builds modules without .weight: quantize, --dry-run
    and compare failed with an AttributeError deep inside. Now each says what --model must be; a truncated
    weights file is named."""
    from vlmptq.plan import plan

    w4 = checkpoints["w4"]
    match = (rf"{re.escape(str(w4))} is already quantized \(quantization_config: compressed-tensors, pack-quantized, "
             r"written by vlmptq\); --model must be a model with 16-bit weights")
    with pytest.raises(UnsupportedModelError, match=match):
        compare(w4, [w4])
    with pytest.raises(UnsupportedModelError, match=match):
        vlmptq.quantize(w4, tmp_path / "again", make_config(method="rtn", group_size=32))
    with pytest.raises(UnsupportedModelError, match=match):
        plan(w4, make_config(method="rtn", group_size=32))
    assert not (tmp_path / "again").exists()
    src = tmp_path / "cut"  # a source model whose weights were cut short by an interrupted copy
    shutil.copytree(tiny_qwen2_vl, src)
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate(100_000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file .* the model is "
                                              "incomplete or corrupt"):
        compare(src, [w4])
    from vlmptq.cli import main

    assert main(["inspect", str(tmp_path / "gone")]) == 2
    assert f"checkpoint {tmp_path / 'gone'} does not exist" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_named(tiny_qwen2_vl, tiny_qwen3_vl, checkpoints, monkeypatch):
    model, _ = load_model(tiny_qwen3_vl, torch.float32)
    with pytest.raises(CheckpointError, match="is it a checkpoint of this model"):
        dequantize_into(model, checkpoints["w4"])
    import vlmptq.compare

    monkeypatch.setattr(vlmptq.compare, "load_model", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(CheckpointError, match="is it a checkpoint of this model"):  # checked on the skeleton
        compare(tiny_qwen3_vl, [checkpoints["w4"]], photos=1, questions=1, device="cpu", lazy_load=False)


def test_a_quantized_tied_head_is_untied_not_written_into_the_embeddings(tiny_qwen2_vl_tied, tmp_path):
    out = tmp_path / "head8"
    vlmptq.quantize(tiny_qwen2_vl_tied, out, make_config(method="rtn", bits=4, group_size=32, lm_head_bits=8))
    model, _ = load_model(tiny_qwen2_vl_tied, torch.float32)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied to begin with
    dequantize_into(model, out)
    assert torch.equal(model.get_input_embeddings().weight, emb_before)
    head = model.get_output_embeddings().weight
    assert not torch.equal(head, emb_before) and (head - emb_before).abs().max() < 0.05 * emb_before.abs().max()


def _whole_model_logprobs(src, ckpt, samples):
    """The oracle: the whole model's own forward pass, with the checkpoint's weights dequantized into it."""
    model, _ = load_model(src, torch.bfloat16)
    if ckpt is not None:
        dequantize_into(model, ckpt)
    return reference_logprobs(model, samples)


def _max_gap(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision",
                                    "idefics3", "smolvlm", "internvl", "gemma3", "mistral3", "gemma4", "exaone4_5",
                                    "minicpmv4_6", "minicpmv4_7"])
def test_layer_by_layer_equals_the_whole_models_forward(family, tiny_qwen2_vl, tiny_qwen2_5_vl, tiny_qwen3_vl,
                                                        tmp_path):
    """compare runs the source and every checkpoint as streams through one decoder layer at a time; their
    log-probabilities must be what each model's own forward pass gives, on every family (deepstack
    features, vision towers and heads differ; Gemma 4's last layers read keys and values earlier layers wrote,
    which each variant must keep to itself)."""
    src = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl}.get(family) or \
        build_tiny_family(family, tmp_path / family, tiny_qwen2_vl)
    w4, w2 = tmp_path / "w4", tmp_path / "w2"
    vlmptq.quantize(src, w4, make_config(method="rtn", bits=4, group_size=32, lm_head_bits=8))
    vlmptq.quantize(src, w2, make_config(method="rtn", bits=2, group_size=32))
    model, adapter, lazy = load_model_lazily(src, torch.bfloat16)
    samples = kl_samples(load_processor(src), adapter.vision_token_ids(), BUILTIN_HOLDOUT[:2], EVAL_QUESTIONS[:1])
    variants = [Variant("source")] + [
        Variant(c.name, {m: _dequantized(ck, d, torch.bfloat16) for m, d in checkpoint_modules(model, ck).items()})
        for c in (w4, w2) for ck in [open_checkpoint(c)]]
    streamed = [lp for _, lp in variant_logprobs(model, adapter, [s.sample for s in samples],
                                                 [s.positions for s in samples], variants, torch.device("cpu"), lazy)]
    lazy.close()
    assert all(p.is_meta for p in adapter.decoder_layers()[1].parameters())  # each layer dropped once done
    for got, ckpt in zip(streamed, (None, w4, w2)):  # bit for bit
        assert _max_gap(got, _whole_model_logprobs(src, ckpt, samples)) == 0, (family, ckpt)
    assert _max_gap(streamed[0], streamed[2]) > 0.1  # the checkpoints' weights were in use


def test_a_variant_that_replaces_modules_before_the_decoder_layers(tiny_qwen2_vl):
    """A checkpoint of another tool may quantize the projector / merger too: that variant gets its own
    capture pass, and the others are unaffected."""
    model, adapter = load_model(tiny_qwen2_vl, torch.bfloat16)
    samples = kl_samples(load_processor(tiny_qwen2_vl), adapter.vision_token_ids(), BUILTIN_HOLDOUT[:1],
                         EVAL_QUESTIONS[:1])
    merger = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "merger" in n)
    halved = model.get_submodule(merger).weight.detach() * 0.5
    variants = [Variant("source"), Variant("halved merger", {merger: lambda dev: halved.to(dev)})]
    streamed = [lp for _, lp in variant_logprobs(model, adapter, [s.sample for s in samples],
                                                 [s.positions for s in samples], variants, torch.device("cpu"))]
    assert torch.equal(model.get_submodule(merger).weight, halved * 2)  # swapped back
    assert _max_gap(streamed[0], reference_logprobs(model, samples)) == 0
    with torch.no_grad():
        model.get_submodule(merger).weight.mul_(0.5)
    assert _max_gap(streamed[1], reference_logprobs(model, samples)) == 0
    assert _max_gap(streamed[0], streamed[1]) > 0.01


def test_lazily_loaded_source_gives_the_same_rows(tiny_qwen2_vl, checkpoints, capsys):
    """--lazy-load reads the source's decoder layers one at a time (and drops them after): same figures."""
    kw = dict(photos=2, questions=1, device="cpu")
    ckpts = [checkpoints["w4"], checkpoints["w2"]]
    assert compare(tiny_qwen2_vl, ckpts, lazy_load=True, **kw) == compare(tiny_qwen2_vl, ckpts, lazy_load=False, **kw)
    from vlmptq.cli import main

    assert main(["compare", "--model", str(tiny_qwen2_vl), str(checkpoints["w4"]), "--photos", "1", "--questions",
                 "1", "--device", "cpu", "--lazy-load"]) == 0
    assert f"| {checkpoints['w4']} | gptq | W4 g32 asym |" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["llama", "gemma3_text", "gemma4_text"])
def test_a_text_only_model_is_compared_on_text(kind, tiny_qwen2_vl, tmp_path, monkeypatch):
    """Text windows (as it calibrates), every position compared; layer by layer equals the whole model's
    forward (Gemma 3's soft-capped logits included; Gemma 4's shared keys and values per checkpoint); without --data it
    fails before loading."""
    src = build_tiny_text_lm(kind, tmp_path / kind, tiny_qwen2_vl)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"Sentence {i} says the tide rose {i % 7} feet at the harbour." for i in range(120)))
    data = CalibConfig(source=str(text), num_samples=3, max_seq_len=48)
    w4 = tmp_path / "w4"
    vlmptq.quantize(src, w4, make_config(method="gptq", bits=4, group_size=32, calib=data))
    (row,) = compare(src, [w4], data=data, device="cpu")
    assert row.prompts == 3 and row.positions == 3 * 48 and 0 < row.kl < 0.5, row

    from vlmptq.calib.text import load_text_calibration
    from vlmptq.demo.evaluate import KLSample

    samples = [KLSample(s, s.text_mask) for s in load_text_calibration(data, load_processor(src, text_only=True))]
    model, adapter = load_model(src, torch.bfloat16)
    ck = open_checkpoint(w4)
    variants = [Variant("source"), Variant("w4", {m: _dequantized(ck, d, torch.bfloat16)
                                                  for m, d in checkpoint_modules(model, ck).items()})]
    streamed = [lp for _, lp in variant_logprobs(model, adapter, [s.sample for s in samples],
                                                 [s.positions for s in samples], variants, torch.device("cpu"))]
    assert _max_gap(streamed[0], _whole_model_logprobs(src, None, samples)) == 0
    assert _max_gap(streamed[1], _whole_model_logprobs(src, w4, samples)) == 0
    if kind == "gemma3_text":  # the soft-cap bounds the logits: |logit| < 3 -> log-probs within 6 of each other
        assert all(float(lp.max(-1).values.min() - lp.min(-1).values.max()) < 6 for lp in streamed[0])

    monkeypatch.setattr("vlmptq.compare.load_model", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(ConfigError, match="is a text-only model and the held-out prompts are photos; compare it on "
                                          "text with --data: a .txt file"):
        compare(src, [w4], device="cpu")


def test_per_layer_drift_is_the_hidden_state_error_of_the_whole_models(tiny_qwen2_vl, checkpoints, capsys):
    """drift[i]: ||h_q - h|| / ||h|| after decoder layer i at the compared positions, as the whole models'
    own hidden states give it; it follows the precision, and the CLI prints it with --per-layer."""
    rows = compare(tiny_qwen2_vl, [checkpoints["w8"], checkpoints["w4"], checkpoints["w2"]], photos=2, questions=1,
                   device="cpu")
    w8, w4, w2 = rows
    assert all(len(r.drift) == 2 for r in rows)  # the tiny model's two decoder layers
    assert all(0 < a < b < c for a, b, c in zip(w8.drift, w4.drift, w2.drift)), [r.drift for r in rows]

    adapter = load_model(tiny_qwen2_vl, torch.bfloat16)[1]
    samples = kl_samples(load_processor(tiny_qwen2_vl), adapter.vision_token_ids(), BUILTIN_HOLDOUT[:2],
                         EVAL_QUESTIONS[:1])

    def layer_outputs(ckpt):  # what enters layer i + 1 (and the final norm) in the model's own forward
        model, adapter = load_model(tiny_qwen2_vl, torch.bfloat16)
        if ckpt is not None:
            dequantize_into(model, ckpt)
        _, layers = adapter.decoder_layers()
        seen = [[] for _ in layers]
        hooks = [layer.register_forward_hook(lambda _m, _a, out, i=i: seen[i].append(
            (out[0] if isinstance(out, tuple) else out).detach())) for i, layer in enumerate(layers)]
        with torch.no_grad():
            for s in samples:
                model(**s.sample.inputs, use_cache=False)
        for h in hooks:
            h.remove()
        return [[h[0][s.positions].float() for h, s in zip(per, samples)] for per in seen]

    ref, q = layer_outputs(None), layer_outputs(checkpoints["w4"])
    for li in range(2):
        num = sum(float((a - b).pow(2).sum()) for a, b in zip(q[li], ref[li]))
        den = sum(float(b.pow(2).sum()) for b in ref[li])
        assert w4.drift[li] == pytest.approx((num / den) ** 0.5, rel=1e-6), li

    from vlmptq.cli import main

    assert main(["compare", "--model", str(tiny_qwen2_vl), str(checkpoints["w4"]), "--photos", "1", "--questions",
                 "1", "--device", "cpu", "--per-layer"]) == 0
    out = capsys.readouterr().out
    assert f"| decoder layer | {checkpoints['w4']} |" in out and "\n| 1 | " in out
