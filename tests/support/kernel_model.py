"""A tiny quantized VLM whose decoder linears run through a plugin kernel's ``prepare`` / ``apply``
(what ``VlmptqLinearMethod`` does inside vLLM, without vLLM), beside the same model holding the
dequantized weights in ordinary ``nn.Linear`` layers. Used on CUDA (``tests/gpu``) and, through the
Triton interpreter, on the CPU (``tests/unit/test_triton_interpret.py``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class KernelLinear(nn.Module):
    """An nn.Linear stand-in holding kernel-prepared tensors (the plugin's linear-method path)."""

    def __init__(self, kernel, tensors, bias):
        super().__init__()
        self.kernel, self.tensors, self.bias = kernel, tensors, bias

    def forward(self, x):
        return self.kernel.apply(self.tensors, x, self.bias)


def logits_through_kernel(model_dir, bits: int, group: int, sym: bool, dtype: torch.dtype, device: str,
                          kernel_for: Callable) -> tuple[torch.Tensor, torch.Tensor, set[str]]:
    """(reference logits, kernel logits, kernel names used) on one image prompt; ``kernel_for(cfg,
    name)`` returns the kernel class for a layer (the plugin's ``choose_kernel`` or a fixed one)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmptq.checkpoint.packing import pack_columns, pack_rows
    from vlmptq.quant.grid import quantize_rtn
    from vlmptq.quant.scheme import WeightScheme
    from vllm_plugin.kernels.base import WNA16LayerConfig

    scheme = WeightScheme(bits, group, sym)
    ref = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    fast = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    chosen = set()
    with torch.no_grad():
        for name, mod in list(ref.named_modules()):
            if not (isinstance(mod, nn.Linear) and ".language_model.layers." in name):
                continue
            qw = quantize_rtn(mod.weight.data.float(), scheme, scale_dtype=dtype)
            mod.weight.copy_(qw.dequantize(dtype))
            n, k = mod.weight.shape
            cfg = WNA16LayerConfig(bits, group, sym, k, n, dtype, torch.device(device).type)
            kernel = kernel_for(cfg, name)(cfg)
            chosen.add(kernel.name)
            tensors = kernel.prepare(pack_rows(qw.codes.to(device), bits), qw.scale.to(device),
                                     None if sym else pack_columns(qw.zero.to(device), bits))
            parent, child = name.rsplit(".", 1)
            bias = fast.get_submodule(name).bias
            setattr(fast.get_submodule(parent), child, KernelLinear(kernel, tensors, bias))
    processor = AutoProcessor.from_pretrained(model_dir)
    image = Image.fromarray((np.random.default_rng(0).random((100, 150, 3)) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = {k: v.to(device) for k, v in processor(text=[text], images=[image], return_tensors="pt").items()}
    with torch.no_grad():
        return ref(**inputs).logits.float(), fast(**inputs).logits.float(), chosen
