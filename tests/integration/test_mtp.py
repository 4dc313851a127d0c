"""Multi-token-prediction (MTP) layers: transformers does not build them, so the quantizer never sees them as part of
the model; the checkpoint carries them from the source files unchanged (``vlmptq/checkpoint/carried.py``), their
linears in ``ignore``, and vLLM's MTP drafter (``speculative_config={"method": "mtp"}``) loads them from it.

vLLM 0.32 builds a drafter whose linears are in ``ignore`` even when the checkpoint has none of its tensors, and
serves with their weights never loaded, silently (measured: an EXAONE 4.5 checkpoint stripped of its ``mtp.*``
tensors, their names left in ``ignore``, loads and generates with MTP on; so does stock vLLM's compressed-tensors path
with a checkpoint holding neither, as vlmptq wrote them before it carried MTP layers: a quantized drafter with no
weights); so the serving tests check the drafter's weights against the source's, not only that the engine starts.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

import vlmptq
from tests.support.tiny_families import add_mtp_layers, build_tiny_family
from vlmptq.config import make_config
from vlmptq.plan import plan

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

QWEN3_5_MTP = {"text_config.mtp_num_hidden_layers": 1}


def _tensors(path, names):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {n: f.get_tensor(n) for n in names}


def _with_mtp(src, dst, layer, config):
    shutil.copytree(src, dst)
    return add_mtp_layers(dst, layer, config)


def test_mtp_layers_are_carried_unchanged(tiny_qwen3_5, tmp_path):
    """A Qwen3.5 release's ``mtp.*`` (one full-attention decoder layer, ``fc`` and three norms): every tensor in the
    output byte for byte as in the source, its linears in ``ignore``, none quantized; the dry run counts them in the
    checkpoint's size; a lazily loaded run writes the same files."""
    src = tmp_path / "src"
    names = _with_mtp(tiny_qwen3_5, src, 3, QWEN3_5_MTP)
    config = make_config(method="rtn", bits=3, group_size=64)
    p = plan(src, config)
    summary = vlmptq.quantize(src, tmp_path / "out", config).checkpoint
    assert summary.n_carried == len(names) == 15 and p.carried == tuple(names)
    assert p.nbytes == summary.bytes_total and "carried: 15 tensors" in p.format()
    got, want = _tensors(summary.path, names), _tensors(src, names)
    assert all(got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]) for n in names)
    qc = json.loads((summary.path / "config.json").read_text())["quantization_config"]
    linears = {n.removesuffix(".weight") for n in names if want[n].dim() == 2}
    assert linears == {"mtp.fc"} | {f"mtp.layers.0.{m}" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    assert linears <= set(qc["ignore"])
    with safe_open(str(summary.path / "model.safetensors"), "pt") as f:
        assert sorted(k for k in f.keys() if k.startswith("mtp.")) == names  # nothing packed among them
    lazy = vlmptq.quantize(src, tmp_path / "lazy", make_config(method="rtn", bits=3, group_size=64, lazy_load=True))
    written = summary.path / "model.safetensors"
    assert (lazy.checkpoint.path / "model.safetensors").read_bytes() == written.read_bytes()


def test_carried_tensors_are_read_as_their_shards_are_written(tiny_qwen3_5, tmp_path):
    """Sharded output: the carried tensors are placed by size like the rest and listed in the index."""
    from safetensors.torch import load_file

    from vlmptq.checkpoint.writer import save_quantized_checkpoint

    src = tmp_path / "src"
    names = _with_mtp(tiny_qwen3_5, src, 3, QWEN3_5_MTP)
    config = make_config(method="rtn", bits=3, group_size=64)
    model, result, _ = vlmptq.quantize_in_memory(src, config)
    summary = save_quantized_checkpoint(model, result.quantized, tmp_path / "out", scheme=config.scheme,
                                        ignore=result.frozen, source_dir=src, max_shard_size=400_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert summary.n_shards > 2 and len({index[n] for n in names}) > 1
    got = {k: t for f in (tmp_path / "out").glob("*.safetensors") for k, t in load_file(f).items()}
    want = _tensors(src, names)
    assert all(torch.equal(got[n], want[n]) for n in names)


def test_carried_linears_for_ignore():
    """The ignore names of the linears among carried tensors: 2-D weights; a transformers-5 fused expert tensor
    [E, ...] as its experts' projections (the names vLLM looks up for a block); norms and biases none."""
    from vlmptq.checkpoint.carried import linear_names

    experts = "mtp.layers.0.mlp.experts"
    got = linear_names({"mtp.fc.weight": (8, 16), "mtp.norm.weight": (8,), "mtp.layers.0.self_attn.q_proj.bias": (8,),
                        f"{experts}.gate_up_proj": (2, 8, 4), f"{experts}.down_proj": (2, 4, 4)})
    assert got == ["mtp.fc", *(f"{experts}.{e}.{p}" for e in (0, 1) for p in ("gate_proj", "up_proj")),
                   *(f"{experts}.{e}.down_proj" for e in (0, 1))]


def test_a_carried_name_the_model_writes_is_refused(tiny_qwen2_vl, tmp_path):
    """A source tensor reported as not built but named like one the model writes (a source saved under names this
    transformers does not read back) is refused before anything is written."""
    from vlmptq.checkpoint.carried import UNBUILT
    from vlmptq.checkpoint.writer import save_quantized_checkpoint
    from vlmptq.errors import CheckpointError

    config = make_config(method="rtn", bits=3, group_size=64)
    model, result, _ = vlmptq.quantize_in_memory(tiny_qwen2_vl, config)
    setattr(model, UNBUILT, ("lm_head.weight",))
    with pytest.raises(CheckpointError, match=r"have the names of tensors the model writes \(lm_head\.weight\)"):
        save_quantized_checkpoint(model, result.quantized, tmp_path / "out", scheme=config.scheme,
                                  ignore=result.frozen, source_dir=tiny_qwen2_vl)
    assert not (tmp_path / "out").exists()


def _drafter_check(llm, src, names):
    """The drafter's linears unquantized (its MoE block too), its fc computing with the source's weight exactly and
    its layer's norms equal to the source's (vLLM-CPU repacks linear weights, so fc is checked by its product)."""
    drafter = llm.llm_engine.model_executor.driver_worker.worker.model_runner.drafter.model
    methods = {n: type(m.quant_method).__name__ for n, m in drafter.named_modules()
               if getattr(m, "quant_method", None) is not None}
    methods = {n: m for n, m in methods.items() if m != "CompressedTensorsKVCacheMethod"}  # stock: no KV scheme
    assert set(methods.values()) <= {"UnquantizedLinearMethod", "UnquantizedEmbeddingMethod",
                                     "UnquantizedFusedMoEMethod"}, methods
    want = _tensors(src, names)
    fc = want["mtp.fc.weight"]
    dtype = next(drafter.parameters()).dtype
    got = drafter.model.fc(torch.eye(fc.shape[1], dtype=dtype)).T
    assert torch.equal(got, fc.to(dtype)), (got.float() - fc.float()).abs().max()
    norms = {n: p for n, p in drafter.named_parameters() if n.startswith("model.layers.0.") and "norm" in n}
    assert norms and all(torch.equal(p, want["mtp." + n.removeprefix("model.")].to(p.dtype)) for n, p in norms.items())
    return methods


def _spec_metrics(llm) -> dict[str, int]:
    return {m.name.removeprefix("vllm:spec_decode_"): m.value for m in llm.get_metrics()
            if m.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens")}


def _mtp_checkpoint(src, out):
    from tests.support.quantized_checkpoint import build_quantized_checkpoint
    from vlmptq.quant.scheme import WeightScheme

    return build_quantized_checkpoint(src, out, WeightScheme(3, 64, False), method="rtn").path


@pytest.fixture(scope="module")
def exaone4_5_mtp(tiny_qwen2_vl, tmp_path_factory):
    """(source, W3 g64 checkpoint, the MTP tensors' names) of a tiny EXAONE 4.5 with one MTP layer."""
    root = tmp_path_factory.mktemp("exaone4_5_mtp")
    base = build_tiny_family("exaone4_5", root / "base", tiny_qwen2_vl)
    vocab = json.loads((base / "config.json").read_text())["text_config"]["vocab_size"]
    # vLLM 0.32's EXAONE 4.5 MTP model reads the vocabulary size from the top-level config
    names = _with_mtp(base, root / "src", 1, {"num_nextn_predict_layers": 1, "vocab_size": vocab})
    return root / "src", _mtp_checkpoint(root / "src", root / "w3"), names


MTP_ENGINE = {"exaone4_5": dict(dtype="float32", mm_device_do_normalize=False),
              "qwen3_5_moe": dict(dtype="bfloat16", enable_prefix_caching=False)}
SPEC = {"method": "mtp", "num_speculative_tokens": 2}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["exaone4_5", "qwen3_5_moe"])
def test_mtp_drafter_serves_from_the_checkpoint(family, request, tmp_path, monkeypatch):
    """vLLM-CPU with MTP speculative decoding (2 draft tokens) on a W3 g64 checkpoint through the plugin: the drafter
    is built from the carried tensors, unquantized, with the source's weights, and drafts. EXAONE 4.5 in fp32: the
    greedy tokens equal those of the same checkpoint served without MTP (speculative decoding is lossless; measured
    equal). Qwen3.5-MoE (its MTP layer a block of 8 experts and a shared expert): bf16 only on vLLM-CPU, where the
    two engines' prompt log-probabilities already differ by ~0.03 and the random model's top tokens tie that
    closely, so its tokens are not compared; vLLM-CPU's speculative decoding of a hybrid (DeltaNet) model needs
    prefix caching off (its prefix-caching state copy is a Triton kernel)."""
    from vllm import SamplingParams

    from tests.support.quantized_checkpoint import vllm_engine

    monkeypatch.setenv("VLMPTQ_DISABLED_KERNELS", "cpu_w4a8,cpu_wna16")
    if family == "exaone4_5":
        src, ckpt, names = request.getfixturevalue("exaone4_5_mtp")
    else:
        src = tmp_path / "src"
        names = _with_mtp(request.getfixturevalue("tiny_qwen3_5_moe"), src, 3, QWEN3_5_MTP)
        ckpt = _mtp_checkpoint(src, tmp_path / "w3")
    prompts = ["Hello, my name is", "The capital of France is"]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    with vllm_engine(ckpt, quantization="vlmptq", speculative_config=SPEC, disable_log_stats=False,
                     **MTP_ENGINE[family]) as llm:
        methods = _drafter_check(llm, src, names)
        out = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        drafted = _spec_metrics(llm)
    assert drafted["num_drafts"] > 0 and drafted["num_draft_tokens"] == 2 * drafted["num_drafts"], drafted
    if family == "qwen3_5_moe":
        assert methods["model.layers.0.mlp.experts.routed_experts"] == "UnquantizedFusedMoEMethod"
        return
    with vllm_engine(ckpt, quantization="vlmptq", **MTP_ENGINE[family]) as llm:
        ref = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert out == ref


@pytest.mark.slow
def test_a_checkpoint_without_mtp_layers_is_refused_by_name(exaone4_5_mtp, tmp_path, monkeypatch):
    """A checkpoint written before the MTP layers were carried (none of their tensors, none in ``ignore``) asked to
    serve MTP: the plugin stops the load at the drafter's first linear and says what is missing and what to do."""
    from safetensors.torch import load_file, save_file

    from tests.support.quantized_checkpoint import vllm_engine

    _, ckpt, _ = exaone4_5_mtp
    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    sd = load_file(old / "model.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith("mtp.")}, old / "model.safetensors",
              metadata={"format": "pt"})
    cfg = json.loads((old / "config.json").read_text())
    qc = cfg["quantization_config"]
    qc["ignore"] = [n for n in qc["ignore"] if not n.startswith("mtp.")]
    (old / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("VLMPTQ_DISABLED_KERNELS", "cpu_w4a8,cpu_wna16")
    with pytest.raises(Exception, match=r"mtp\.fc: the checkpoint has no tensor.*multi-token-prediction"):
        with vllm_engine(old, quantization="vlmptq", speculative_config=SPEC, **MTP_ENGINE["exaone4_5"]):
            pass


@pytest.mark.slow
def test_stock_vllm_serves_the_mtp_drafter_too(exaone4_5_mtp, tmp_path):
    """Without the plugin (``--quantization compressed-tensors``; vLLM-CPU's stock kernels take 4 bits, in bf16):
    the carried layers in ``ignore`` give the same unquantized drafter with the source's weights."""
    from tests.support.quantized_checkpoint import build_quantized_checkpoint, vllm_engine
    from vlmptq.quant.scheme import WeightScheme

    src, _, names = exaone4_5_mtp
    ckpt = build_quantized_checkpoint(src, tmp_path / "w4", WeightScheme(4, 64, False), method="rtn").path
    with vllm_engine(ckpt, quantization="compressed-tensors", speculative_config=SPEC, disable_log_stats=False,
                     dtype="bfloat16", mm_device_do_normalize=False) as llm:
        _drafter_check(llm, src, names)
        llm.generate(["Hello, my name is"], use_tqdm=False)
        assert _spec_metrics(llm)["num_drafts"] > 0
