"""``vlmptq quantize --dry-run`` (``vlmptq/plan.py``): from the config alone, the schemes per linear
and the checkpoint's size, exactly what a run then writes; the same errors as a run; nothing written."""

from __future__ import annotations

import pytest

import vlmptq
from vlmptq.config import SchemeOverride, make_config
from vlmptq.errors import ConfigError
from vlmptq.plan import plan

MIXED = (SchemeOverride.parse(r"mlp\.down_proj$=4"), SchemeOverride.parse(r"layers\.1\.self_attn\.[qkv]_proj$=8:64"))


@pytest.mark.parametrize("arch,fields", [
    ("qwen2_vl", dict(bits=2, group_size=32, overrides=MIXED, lm_head_bits=8, ignore=(r"layers\.0\.mlp\.(gate|up)_proj$",))),
    ("qwen2_5_vl", dict(bits=3, group_size=64, symmetric=True)),
])
def test_plan_is_what_the_run_writes(request, tmp_path, arch, fields):
    src = request.getfixturevalue(f"tiny_{arch}")
    config = make_config(method="rtn", **fields)
    p = plan(src, config)
    summary = vlmptq.quantize(src, tmp_path / "out", config).checkpoint
    assert sum(s.nbytes for s in p.shares) == summary.bytes_quantized_layers
    assert p.nbytes == summary.bytes_total
    assert sum(s.linears for s in p.shares) == summary.n_quantized
    assert p.decoder_layers == 2 and p.model_type == arch
    text = p.format()
    if arch == "qwen2_vl":
        assert {s.scheme: s.linears for s in p.shares} == {"W2 g32 asym": 7, "W4 g32 asym": 2, "W8 g64 asym": 3,
                                                           "lm_head W8 g32 asym": 1}
        assert len(p.kept_linears) == 2 and "2 decoder linears kept by --ignore" in text
    assert "x smaller than" in text


def test_dry_run_checks_like_a_run_and_writes_nothing(tiny_qwen2_vl, tmp_path, capsys):
    bad = make_config(method="rtn", bits=2, group_size=32, overrides=(SchemeOverride.parse(r"\.k_proj$=4"),))
    with pytest.raises(ConfigError, match="vLLM serves q_proj / k_proj / v_proj as one fused layer"):
        plan(tiny_qwen2_vl, bad)
    with pytest.raises(ConfigError, match="not divisible by group_size=128"):
        plan(tiny_qwen2_vl, make_config(group_size=128))
    from vlmptq.cli import main

    out = tmp_path / "never"
    assert main(["quantize", "--model", str(tiny_qwen2_vl), "--out", str(out), "--bits", "3", "--group-size", "64",
                 "--override", r"down_proj$=4", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "W3 g64 asym" in printed and "W4 g64 asym" in printed and "checkpoint  " in printed
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("fields,match", [
    (dict(ignore=("down_prj",)), r"--ignore 'down_prj' matches no decoder linear \(decoder linears are named like "
                                 r"'model\.language_model\.layers\.0\.self_attn\.q_proj'; the vision tower"),
    (dict(ignore=("visual",)), r"--ignore 'visual' matches no decoder linear .* always kept in 16-bit"),
    (dict(overrides=(r"layer\.1\.=8",)), r"--override 'layer\\\.1\\\.' matches no decoder linear"),
    (dict(overrides=(r"layers\.1\.=8", r"layers\.1\.mlp=3")),
     r"--override 'layers\\\.1\\\.mlp' changes nothing: every decoder linear it matches "
     r"\(\S+layers\.1\.mlp\.down_proj, \S+gate_proj, \S+up_proj\) is taken by an earlier --override "
     r"\(the first match wins\)"),
])
def test_patterns_that_take_no_linear_are_refused(tiny_qwen2_vl, tmp_path, fields, match):
    """A typo in --ignore / --override changed nothing, silently: the run quantized as if it were not there."""
    if "overrides" in fields:
        fields = dict(overrides=tuple(SchemeOverride.parse(o) for o in fields["overrides"]))
    config = make_config(method="rtn", bits=2, group_size=32, **fields)
    with pytest.raises(ConfigError, match=match):
        plan(tiny_qwen2_vl, config)
    with pytest.raises(ConfigError, match=match):
        vlmptq.quantize(tiny_qwen2_vl, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
    ok = (SchemeOverride.parse(r"layers\.1\.mlp=3"), SchemeOverride.parse(r"layers\.1\.=8"))  # in the right order
    assert plan(tiny_qwen2_vl, make_config(method="rtn", bits=2, group_size=32, overrides=ok)).shares


def test_plan_counts_the_host_memory_of_both_loading_modes(tiny_qwen2_vl):
    """The memory line's parameter counts are the loaded model's; the calibration bound follows the
    method's streams (two for the asymmetric methods, none for RTN)."""
    from vlmptq.calib import CalibConfig
    from vlmptq.models.adapters import load_model

    model, adapter = load_model(tiny_qwen2_vl)
    _, layers = adapter.decoder_layers()
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    p = plan(tiny_qwen2_vl, make_config(method="vlmptq", group_size=32,
                                        calib=CalibConfig(num_samples=4, max_seq_len=100)))
    assert p.total_params == sum(t.numel() for t in model.parameters())
    assert (p.layer_params, p.largest_layer_params) == (sum(per_layer), max(per_layer))
    hidden = model.get_input_embeddings().weight.shape[1]
    assert p.calib_bytes == 2 * 4 * 100 * hidden * 2  # two streams, bf16
    text = p.format()
    assert "host memory" in text and "with --lazy-load" in text and "4 samples x 100 tokens" in text
    assert plan(tiny_qwen2_vl, make_config(method="rtn", group_size=32)).calib_bytes == 0


def test_plan_counts_gemma4s_per_layer_inputs_and_shared_keys_and_values(tiny_qwen2_vl, tmp_path):
    """Gemma 4's layers also take a per-layer input (recorded once with their arguments) and its last layers reuse
    earlier layers' keys and values (held per sample and stream until the last layer): both count in the bound. The
    tiny model: 4 layers of 64 per-layer inputs; layers 0 and 1 store K/V of widths 64 and 128 (k_proj), twice."""
    from vlmptq.calib import CalibConfig
    from tests.support.tiny_families import build_tiny_family

    src = build_tiny_family("gemma4", tmp_path / "gemma4", tiny_qwen2_vl)
    p = plan(src, make_config(method="vlmptq", group_size=64, calib=CalibConfig(num_samples=4, max_seq_len=100)))
    assert p.calib_bytes == (2 * 4 * 100 * (192 + 2 * (64 + 128)) + 4 * 100 * 4 * 64) * 2
    assert "(192 + shared keys and values 384) x 2 B x 2 streams, + per-layer inputs (4 layers x 64" in p.format()


def test_linears_the_model_keeps_in_16bit(tiny_qwen3_5, caplog):
    """Qwen3.5 keeps DeltaNet's in_proj_b / in_proj_a in 16-bit whatever the flags: --ignore naming them asks for
    what holds already (logged, not refused); --override naming only them is refused with the reason."""
    import logging

    with caplog.at_level(logging.INFO, logger="vlmptq"):
        p = plan(tiny_qwen3_5, make_config(method="rtn", bits=3, group_size=64, ignore=(r"in_proj_[ab]$",)))
    assert "matches only linears this model always keeps in 16-bit" in caplog.text
    assert not p.kept_linears and sum(s.linears for s in p.shares) == 25
    config = make_config(method="rtn", bits=3, group_size=64, overrides=(SchemeOverride.parse(r"in_proj_a$=4"),))
    with pytest.raises(ConfigError, match=r"--override 'in_proj_a\$' matches only linears this model keeps in 16-bit "
                                          r"\(\S+layers\.0\.linear_attn\.in_proj_a, .*vLLM serves them unquantized"):
        plan(tiny_qwen3_5, config)
