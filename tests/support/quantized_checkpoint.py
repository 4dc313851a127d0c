"""Quantized tiny checkpoints for serving tests: RTN on every decoder linear, written by vlmptq.

One place to switch to ``vlmptq.quantize`` once the full quantizer lands. The helper also returns
the dequantized weights it wrote, so tests can build the HF reference model with exactly the
weights the server should compute with.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmptq.quant.grid import quantize_rtn
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
) -> QuantizedCheckpoint:
    """RTN-quantize every decoder linear of ``model_dir`` with ``scheme``; save to ``out_dir``."""
    from vlmptq.checkpoint.writer import save_quantized_checkpoint

    model = load_hf_model(model_dir)
    quantized, ignore = {}, []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if DECODER_LINEAR.match(name):
            quantized[name] = quantize_rtn(
                mod.weight.data.float(), scheme, scale_dtype=torch.bfloat16
            )
        else:
            ignore.append(name)
    save_quantized_checkpoint(
        model,
        quantized,
        out_dir,
        scheme=scheme,
        ignore=ignore,
        source_dir=model_dir,
        metadata=metadata or {"method": "rtn"},
        overwrite=True,
    )
    return QuantizedCheckpoint(Path(out_dir), scheme, quantized, ignore)


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
    (exact fp32 values, then cast to ``dtype``)."""
    model = load_hf_model(model_dir, dtype=dtype)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, qw in ckpt.quantized.items():
            modules[name].weight.copy_(exact_dequantize(qw).to(dtype))
    return model


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


def layer_methods(llm) -> dict[str, tuple[str, str | None]]:
    """``{vLLM module name: (quant method class, vlmptq kernel name or None)}`` for every linear."""

    def collect(model):
        from vllm.model_executor.layers.linear import LinearBase

        out = {}
        for name, mod in model.named_modules():
            if isinstance(mod, LinearBase):
                kernel = getattr(mod.quant_method, "kernel", None)
                out[name] = (type(mod.quant_method).__name__, getattr(kernel, "name", None))
        return out

    return llm.apply_model(collect)[0]
