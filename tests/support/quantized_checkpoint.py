"""Quantized tiny checkpoints for serving tests: RTN on every decoder linear, written by vlmptq.

One place to switch to ``vlmptq.quantize`` once the full quantizer lands. The helper also returns
the dequantized weights it wrote, so tests can build the HF reference model with exactly the
weights the server should compute with.
"""

from __future__ import annotations

import re
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
    model_dir: str | Path, out_dir: str | Path, scheme: WeightScheme, metadata: dict | None = None,
) -> QuantizedCheckpoint:
    """RTN-quantize every decoder linear of ``model_dir`` with ``scheme`` and save it to ``out_dir``."""
    from vlmptq.checkpoint.writer import save_quantized_checkpoint

    model = load_hf_model(model_dir)
    quantized, ignore = {}, []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if DECODER_LINEAR.match(name):
            quantized[name] = quantize_rtn(mod.weight.data.float(), scheme, scale_dtype=torch.bfloat16)
        else:
            ignore.append(name)
    save_quantized_checkpoint(
        model, quantized, out_dir, scheme=scheme, ignore=ignore, source_dir=model_dir,
        metadata=metadata or {"method": "rtn"}, overwrite=True,
    )
    return QuantizedCheckpoint(Path(out_dir), scheme, quantized, ignore)


def exact_dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """``(codes - zero) * scale`` in fp32 without rounding to the scale's dtype: what a server
    running in fp32 computes with (its scales are the checkpoint's, widened to fp32)."""
    glen = qw.scheme.group_len(qw.codes.shape[1])
    z = qw.zero.float().repeat_interleave(glen, dim=1)
    s = qw.scale.float().repeat_interleave(glen, dim=1)
    return (qw.codes.float() - z) * s


def dequantized_hf_model(model_dir: str | Path, ckpt: QuantizedCheckpoint, dtype: torch.dtype = torch.float32):
    """The original model with every quantized linear's weight replaced by its dequantized value
    (exact fp32 values, then cast to ``dtype``)."""
    model = load_hf_model(model_dir, dtype=dtype)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, qw in ckpt.quantized.items():
            modules[name].weight.copy_(exact_dequantize(qw).to(dtype))
    return model
