"""Quantized tiny checkpoints for serving tests, written by the quantizer itself (VLM-PTQ by
default). The helper also returns the quantized weights it wrote, so tests can build the HF
reference model with exactly the weights the server should compute with.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmptq.pipeline.capture import pixels_in
from vlmptq.quant.qweight import QuantizedWeight
from vlmptq.quant.scheme import WeightScheme

# Decoder linears of the language model (transformers-5 module names), the paper's scope.
DECODER_LINEAR = re.compile(r"^model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+$")


@dataclass
class QuantizedCheckpoint:
    path: Path
    scheme: WeightScheme
    quantized: dict[str, QuantizedWeight]  # module name -> what was written
    ignore: list[str]  # module names kept in 16 bit


def load_hf_model(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16):
    """The tiny checkpoint as its real transformers class (eval mode, on CPU)."""
    from transformers import AutoConfig

    import transformers

    cfg = AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, cfg.architectures[0])
    return cls.from_pretrained(model_dir, dtype=dtype).eval()


def build_quantized_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    scheme: WeightScheme,
    metadata: dict | None = None,
    method: str = "vlmptq",
    head_scheme: WeightScheme | None = None,
    overrides: tuple[str, ...] = (),
) -> QuantizedCheckpoint:
    """Quantize ``model_dir`` with the quantizer (``method``, 2 built-in calibration samples; the
    lm_head too with ``head_scheme``; ``overrides``: ``REGEX=BITS[:GROUP]`` mixed precision) and save
    it to ``out_dir``; the returned weights are exactly what the checkpoint holds."""
    import vlmptq
    from vlmptq.calib import CalibConfig
    from vlmptq.checkpoint.writer import save_quantized_checkpoint
    from vlmptq.config import SchemeOverride

    config = vlmptq.make_config(
        method=method, bits=scheme.bits, group_size=scheme.group_size, symmetric=scheme.symmetric,
        calib=CalibConfig(num_samples=2, max_seq_len=512), device="cpu",
        lm_head_bits=head_scheme.bits if head_scheme else None,
        lm_head_group_size=head_scheme.group_size if head_scheme else None,
        overrides=tuple(SchemeOverride.parse(o) for o in overrides),
    )
    model, result, _ = vlmptq.quantize_in_memory(model_dir, config)
    save_quantized_checkpoint(
        model, result.quantized, out_dir, scheme=scheme, ignore=result.frozen, source_dir=model_dir,
        metadata=metadata or {"method": method}, overwrite=True,
    )
    return QuantizedCheckpoint(Path(out_dir), scheme, result.quantized, result.frozen)


def exact_dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """``(codes - zero) * scale`` in fp32 without rounding to the scale's dtype: what a server
    running in fp32 computes with (its scales are the checkpoint's, widened to fp32)."""
    glen = qw.scheme.group_len(qw.codes.shape[1])
    z = qw.zero.float().repeat_interleave(glen, dim=1)
    s = qw.scale.float().repeat_interleave(glen, dim=1)
    return (qw.codes.float() - z) * s


def dequantized_hf_model(
    model_dir: str | Path, ckpt: QuantizedCheckpoint, dtype: torch.dtype = torch.float32
):
    """The original model with every quantized linear's weight replaced by its dequantized value
    (exact fp32 values, then cast to ``dtype``); an expert's projection (``...experts.{e}.gate_proj``) goes to
    its rows of transformers' fused ``experts.gate_up_proj`` / ``experts.down_proj`` (Llama 4's: columns)."""
    model = load_hf_model(model_dir, dtype=dtype)
    head = model.get_output_embeddings()
    if head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr() and "lm_head" in ckpt.quantized:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # as the quantizer does
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, qw in ckpt.quantized.items():
            _weight_of(modules, name).copy_(exact_dequantize(qw).to(dtype))
    return model


def _weight_of(modules: dict[str, torch.nn.Module], name: str) -> torch.Tensor:
    if name in modules:
        return modules[name].weight
    path, e, proj = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)", name).groups()
    fused, e = modules[path], int(e)
    gate_up, down = fused.gate_up_proj[e], fused.down_proj[e]
    if type(fused).__name__ == "Llama4TextExperts":  # [H, 2I] and [I, H]: x @ w
        gate_up, down = gate_up.t(), down.t()
    i = down.shape[-1]
    return {"gate_proj": gate_up[:i], "up_proj": gate_up[i:], "down_proj": down}[proj]


def dequantized_source_copy(model_dir: str | Path, ckpt: QuantizedCheckpoint, dst: str | Path) -> Path:
    """A dense fp32 copy of the source checkpoint (its own tensor names and layout) with every quantized
    linear's weight replaced by its exact dequantized value: what an unquantized engine compares with."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vlmptq.checkpoint.naming import module_disk_names

    model = load_hf_model(model_dir, dtype=torch.float32)
    names = module_disk_names(model, list(ckpt.quantized), model.state_dict().keys())
    dst = Path(dst)
    shutil.copytree(model_dir, dst)
    done = set()
    for f in dst.glob("*.safetensors"):
        sd = {k: v.float() for k, v in load_file(f).items()}
        for module, disk in names.items():
            if f"{disk}.weight" in sd:
                sd[f"{disk}.weight"] = exact_dequantize(ckpt.quantized[module])
                done.add(module)
        save_file(sd, f, metadata={"format": "pt"})
    assert done == set(names), sorted(set(names) - done)
    return dst


# ----------------------------------------------------------------------------- serving helpers


def pattern_image(width: int = 140, height: int = 112):
    """A deterministic RGB pattern (no files needed); 140x112 px -> 20 merged vision tokens."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 2) % 256, (y * 3) % 256, ((x + y) * 5) % 256], -1).astype(np.uint8)
    return Image.fromarray(rgb)


ENGINE_DEFAULTS = dict(
    max_model_len=1024,
    max_num_seqs=4,
    limit_mm_per_prompt={"image": 1},
    kv_cache_memory_bytes=1 << 28,  # fixed KV budget: the share-of-RAM check fails on busy machines
    enforce_eager=True,
    seed=0,
)


@contextmanager
def vllm_engine(model: str | Path, **kwargs):
    """An in-process vLLM engine (set VLLM_ENABLE_V1_MULTIPROCESSING=0), torn down afterwards so the
    next one can start in the same process."""
    import gc

    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm = None
    try:
        llm = LLM(str(model), **{**ENGINE_DEFAULTS, **kwargs})
        yield llm
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def _linear_methods(model) -> dict[str, tuple[str, str | None]]:
    # module level: multi-process engines pickle it to their workers
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (LinearBase, ParallelLMHead)):
            kernel = getattr(mod.quant_method, "kernel", None)
            out[name] = (type(mod.quant_method).__name__, getattr(kernel, "name", None))
    return out


def _linear_schemes(model) -> dict[str, tuple[int, int, bool]]:
    return {name: (m.quant_method.scheme.bits, m.quant_method.scheme.group_size, m.quant_method.scheme.symmetric)
            for name, m in model.named_modules() if hasattr(getattr(m, "quant_method", None), "scheme")}


def layer_schemes(llm, rank: int = 0) -> dict[str, tuple[int, int, bool]]:
    """``{vLLM module name: (bits, group size, symmetric)}`` for every layer served by the plugin."""
    return llm.apply_model(_linear_schemes)[rank]


def layer_methods(llm, rank: int = 0) -> dict[str, tuple[str, str | None]]:
    """``{vLLM module name: (quant method class, vlmptq kernel name or None)}`` for every linear and LM head of
    ``rank``'s model (multi-process engines need ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``)."""
    return llm.apply_model(_linear_methods)[rank]


def _moe_methods(model) -> dict[str, tuple[str, tuple[int, int, bool] | None]]:
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, RoutedExperts):
            s = getattr(m.quant_method, "scheme", None)  # ours; vLLM's methods keep theirs elsewhere
            out[name] = (type(m.quant_method).__name__, (s.bits, s.group_size, s.symmetric) if s else None)
    return out


def moe_methods(llm, rank: int = 0) -> dict[str, tuple[str, tuple[int, int, bool] | None]]:
    """``{vLLM module name: (quant method class, (bits, group size, symmetric) for ours)}`` for every
    mixture-of-experts block (``RoutedExperts``)."""
    return llm.apply_model(_moe_methods)[rank]


def generate(llm, vllm_inputs):
    """Greedy, 8 tokens, with the logprob of each chosen token and of every prompt token."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=1, prompt_logprobs=0)
    return llm.generate(vllm_inputs, params, use_tqdm=False)


def logprob_errors(hf, hf_inputs, outputs) -> tuple[list[float], list[float]]:
    """|vLLM - HF| for every prompt token after the first and every generated token, plus for each
    generated token HF's margin ``max logprob - logprob(chosen)``. HF runs teacher-forced on prompt +
    generated tokens with the processor's other inputs (per-token ones, e.g. ``mm_token_type_ids``,
    extended with zeros over the generated tokens)."""
    errs, margins = [], []
    for inp, out in zip(hf_inputs, outputs, strict=True):
        ids = list(out.prompt_token_ids)
        assert ids == inp["input_ids"][0].tolist(), "vLLM and HF tokenized / expanded the prompt differently"
        gen = list(out.outputs[0].token_ids)
        assert len(gen) > 0
        full = torch.tensor([ids + gen])
        extra = {}
        for key, v in inp.items():
            if key in ("input_ids", "attention_mask"):
                continue
            if key != "pixel_values" and torch.is_tensor(v) and v.dim() == 2 and v.shape == (1, len(ids)):
                v = torch.cat([v, torch.zeros(1, len(gen), dtype=v.dtype)], 1)
            extra[key] = v
        with torch.no_grad():  # pixels in the model's dtype, as the quantizer feeds them (Llama 4's tower needs it)
            logits = hf(input_ids=full, attention_mask=torch.ones_like(full),
                        **pixels_in(extra, hf.dtype)).logits[0].float()
        lp = torch.log_softmax(logits, -1)  # row i predicts token i + 1
        for i in range(1, len(ids)):
            errs.append(abs(out.prompt_logprobs[i][ids[i]].logprob - lp[i - 1, ids[i]].item()))
        for j, tok in enumerate(gen):
            row = lp[len(ids) - 1 + j]
            errs.append(abs(out.outputs[0].logprobs[j][tok].logprob - row[tok].item()))
            margins.append((row.max() - row[tok]).item())
    return errs, margins
