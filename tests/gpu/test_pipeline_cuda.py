"""The quantizer itself on CUDA: ``vlmptq.quantize(..., device="cuda")`` end to end (calibration capture,
statistics, solvers, write-back, the W8 head, the checkpoint) and ``vlmptq.compare`` on the GPU, each
beside the same run on the CPU.

Everything else in the suite runs the pipeline on the CPU; this is what a user with a GPU runs. The two
devices sum in different orders, so GPTQ's column loop can round a few weights the other way and the
error compensation then differs in the columns after them: the runs are not bit-identical, and the test
compares what the solver minimises (each linear's relative output error on its calibration inputs),
not the codes. A device bug (statistics from the wrong stream, a mask on the wrong tokens, a missing
transfer) moves those errors by far more than the tolerances below.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [  # method, bits, offload_device (where the per-sample activations wait between layers)
    ("vlmptq", 3, "cpu"),
    ("gptq", 4, "cpu"),
    ("vlmptq", 2, "cuda"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vlmptq.testing.tiny_vlm import build_tiny_qwen_vl

    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny"), "qwen2_vl")


def quantize_on(model_dir, out, device: str, method: str, bits: int, offload: str, resume: bool = False,
                lazy_load: bool = False):
    import vlmptq
    from vlmptq.calib import CalibConfig
    from vlmptq.config import make_config

    config = make_config(method=method, bits=bits, group_size=32, lm_head_bits=8, device=device,
                         offload_device=offload if device != "cpu" else "cpu", resume=resume, lazy_load=lazy_load,
                         calib=CalibConfig(source="builtin", num_samples=3, max_seq_len=512))
    return vlmptq.quantize(model_dir, out, config)


def tensors(out) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``out``."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def relative_errors(report) -> dict[str, float]:
    return {r.name: r.rel_error for r in report.records}


@pytest.mark.parametrize("method,bits,offload", CASES, ids=lambda v: str(v))
def test_quantize_on_cuda_matches_the_cpu_run(tiny, tmp_path, method, bits, offload):
    from vlmptq.checkpoint.reader import inspect_checkpoint

    cpu = quantize_on(tiny, tmp_path / "cpu", "cpu", method, bits, offload)
    gpu = quantize_on(tiny, tmp_path / "gpu", "cuda", method, bits, offload)
    assert gpu.peak_memory_bytes and gpu.peak_memory_bytes > 0
    assert not (tmp_path / "gpu.vlmptq-progress").exists()  # the layer store is gone once the checkpoint is
    a, b = relative_errors(cpu), relative_errors(gpu)
    assert a.keys() == b.keys() and len(a) == 15  # 2 layers x 7 linears + the W8 lm_head
    for name in a:
        assert math.isfinite(b[name]) and 0 < b[name] < 0.5, (name, b[name])
        assert b[name] == pytest.approx(a[name], rel=0.25, abs=1e-4), name
    assert sum(b.values()) == pytest.approx(sum(a.values()), rel=0.05)
    if method == "vlmptq":  # the per-layer mu is chosen from the same grid on both
        mus = [r.info["mu"] for r in gpu.records if "mu" in r.info]
        assert mus and all(m in (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0) for m in mus)
    ra, rb = inspect_checkpoint(tmp_path / "cpu"), inspect_checkpoint(tmp_path / "gpu")
    assert (rb.scheme, len(rb.layers), rb.ignore) == (ra.scheme, len(ra.layers), ra.ignore)


def test_compare_on_cuda_matches_the_cpu(tiny, tmp_path):
    import vlmptq.compare as cmp

    quantize_on(tiny, tmp_path / "w3", "cuda", "vlmptq", 3, "cpu")
    on_cpu, = cmp.compare(tiny, [tmp_path / "w3"], photos=2, questions=1, device="cpu", dtype=torch.float32)
    on_gpu, = cmp.compare(tiny, [tmp_path / "w3"], photos=2, questions=1, device="cuda", dtype=torch.float32)
    assert on_gpu.positions == on_cpu.positions > 0
    assert math.isfinite(on_gpu.kl) and on_gpu.kl == pytest.approx(on_cpu.kl, rel=1e-2, abs=1e-5)
    assert on_gpu.top1 == pytest.approx(on_cpu.top1, abs=2 / on_cpu.positions)
    # the source read one decoder layer at a time from its files: the same figures on the same device
    lazily, = cmp.compare(tiny, [tmp_path / "w3"], photos=2, questions=1, device="cuda", dtype=torch.float32,
                          lazy_load=True)
    assert (lazily.kl, lazily.top1) == (on_gpu.kl, on_gpu.top1)


def test_a_run_stopped_on_cuda_resumes_on_the_cpu(tiny, tmp_path, monkeypatch):
    """The progress store is device-neutral (a pre-empted GPU job may continue elsewhere): a run stopped in
    layer 1 on CUDA, resumed with --device cpu, solves only layer 1 and the head again, and keeps layer 0
    exactly as an uninterrupted CUDA run wrote it (which also shows the GPU run is deterministic)."""
    import vlmptq.pipeline.sequential as sequential
    from vlmptq.pipeline.progress import progress_dir_for
    from tests.support.interrupt import interrupt_in_layer

    quantize_on(tiny, tmp_path / "full", "cuda", "vlmptq", 3, "cpu")
    original, solved = sequential._solve_linear, []
    interrupt_in_layer(monkeypatch, lambda: quantize_on(tiny, tmp_path / "out", "cuda", "vlmptq", 3, "cpu"))
    assert progress_dir_for(tmp_path / "out").is_dir() and not (tmp_path / "out").exists()

    def count(lin, full, *args, **kwargs):
        solved.append(full)
        return original(lin, full, *args, **kwargs)

    monkeypatch.setattr(sequential, "_solve_linear", count)
    quantize_on(tiny, tmp_path / "out", "cpu", "vlmptq", 3, "cpu", resume=True)
    assert len(solved) == 7 + 1 and not any(".layers.0." in n for n in solved)
    full, got = tensors(tmp_path / "full"), tensors(tmp_path / "out")
    assert sorted(full) == sorted(got)
    layer0 = [k for k in full if ".layers.0." in k]
    assert layer0 and all(torch.equal(full[k], got[k]) for k in layer0)


def test_lazy_load_on_cuda_writes_the_same_checkpoint(tiny, tmp_path):
    """--lazy-load reads each decoder layer from the files on the CPU, then moves it to the GPU: the
    checkpoint equals the whole-model run's on the same device, bit for bit."""
    quantize_on(tiny, tmp_path / "whole", "cuda", "vlmptq", 3, "cpu")
    quantize_on(tiny, tmp_path / "lazy", "cuda", "vlmptq", 3, "cpu", lazy_load=True)
    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / "lazy")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sensitivity_on_cuda_matches_the_cpu(tiny, tmp_path):
    """--target-bits' pass on the GPU measures what it measures on the CPU (up to summation order), and the run
    it leads to stays within the budget."""
    import vlmptq
    from vlmptq.api import _calibration_samples
    from vlmptq.calib import CalibConfig
    from vlmptq.checkpoint.reader import open_checkpoint
    from vlmptq.config import make_config
    from vlmptq.models.adapters import load_model, load_skeleton
    from vlmptq.pipeline.sensitivity import measure_sensitivity
    from vlmptq.quant.scheme import WeightScheme

    config = make_config(method="vlmptq", target_bits=3, group_size=32, device="cuda",
                         calib=CalibConfig(source="builtin", num_samples=3, max_seq_len=512))
    skeleton, adapter = load_skeleton(tiny, torch.bfloat16)
    samples = _calibration_samples(tiny, config, skeleton, adapter)
    losses = {}
    for device in ("cpu", "cuda"):
        model, adapter = load_model(tiny, torch.bfloat16)
        units = measure_sensitivity(model, adapter, samples, [WeightScheme(b, 32) for b in (2, 3, 4)], device=device)
        losses[device] = {u.names: u.losses for u in units}
    assert losses["cpu"].keys() == losses["cuda"].keys() and len(losses["cpu"]) == 8
    for names, cpu in losses["cpu"].items():
        for b, v in cpu.items():
            assert losses["cuda"][names][b] == pytest.approx(v, rel=0.1), (names, b)
    vlmptq.quantize(tiny, tmp_path / "auto", config)
    ckpt = open_checkpoint(tmp_path / "auto")
    weights = [ckpt.quantized_weight(n) for n in ckpt.layers]
    assert sum(w.scheme.bits * w.numel() for w in weights) <= 3 * sum(w.numel() for w in weights)


@pytest.mark.parametrize("offload", ["cpu", "cuda"])
def test_moe_on_cuda_matches_the_cpu_run(tmp_path, offload):
    """Mixture-of-experts blocks on CUDA: the experts' inputs wait on the offload device and move expert by
    expert; every expert is solved on its routed tokens (near-tie routing may differ between devices, the total
    cannot: each token reaches 2 experts per layer)."""
    from vlmptq.testing.tiny_vlm import build_tiny_qwen_vl

    src = build_tiny_qwen_vl(tmp_path / "moe", "qwen3_vl_moe")
    cpu = quantize_on(src, tmp_path / "cpu", "cpu", "vlmptq", 3, offload)
    gpu = quantize_on(src, tmp_path / "gpu", "cuda", "vlmptq", 3, offload)
    a, b = relative_errors(cpu), relative_errors(gpu)
    assert a.keys() == b.keys() and len(a) == 2 * (4 + 3 * 8) + 1
    for name in a:
        assert math.isfinite(b[name]) and 0 < b[name] < 0.5, (name, b[name])
    assert sum(b.values()) == pytest.approx(sum(a.values()), rel=0.05)
    for layer in (0, 1):
        routed = [{r.name: r.info["routed_tokens"] for r in rep.records if "routed_tokens" in r.info
                   and f"layers.{layer}." in r.name and r.name.endswith("gate_proj")} for rep in (cpu, gpu)]
        assert sum(routed[0].values()) == sum(routed[1].values()) > 0
