"""A tiny quantized VLM whose decoder linears run through a plugin kernel's ``prepare`` / ``apply``
(what ``VlmptqLinearMethod`` does inside vLLM, without vLLM), beside the same model holding the
dequantized weights in ordinary ``nn.Linear`` layers; and a tiny mixture-of-experts VLM whose experts run
through the fused MoE op (``logits_through_fused_moe``). Used on CUDA (``tests/gpu``) and, through the
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
    from transformers import AutoModelForImageTextToText

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
    inputs = image_prompt(model_dir, device)
    with torch.no_grad():
        return ref(**inputs).logits.float(), fast(**inputs).logits.float(), chosen


def image_prompt(model_dir, device: str) -> dict:
    """The processor's inputs for one question about a random 100 x 150 image."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    image = Image.fromarray((np.random.default_rng(0).random((100, 150, 3)) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return {k: v.to(device) for k, v in processor(text=[text], images=[image], return_tensors="pt").items()}


class FusedExperts(nn.Module):
    """An unfused-experts stand-in (``forward(hidden [T, H], top_k_index, top_k_weights)``) running the plugin's
    fused MoE op on repacked experts: what ``VlmptqFusedMoEMethod.apply`` does inside vLLM."""

    def __init__(self, w13: tuple, w2: tuple, bits: int):
        super().__init__()
        self.w13, self.w2, self.bits = w13, w2, bits

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return torch.ops.vlmptq.wna16_moe(hidden_states, top_k_index, top_k_weights, *self.w13, *self.w2,
                                          self.bits, "silu")


def logits_through_fused_moe(model_dir, bits: int, group: int, sym: bool, dtype: torch.dtype, device: str
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference logits, fused-kernel logits) of a mixture-of-experts VLM on one image prompt: every routed
    expert quantized (RTN; attention stays 16-bit), the reference holding the dequantized experts in transformers'
    loop, the other running them through the fused MoE op with transformers' own routing."""
    from transformers import AutoModelForImageTextToText

    from vlmptq.checkpoint.packing import pack_columns, pack_rows
    from vlmptq.models.experts import experts_modules, unfuse_experts
    from vlmptq.quant.grid import quantize_rtn
    from vlmptq.quant.scheme import WeightScheme
    from vllm_plugin.kernels.triton.moe import repack_experts

    scheme = WeightScheme(bits, group, sym)
    ref, fast = (AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device).eval()
                 for _ in range(2))
    with torch.no_grad():
        for model in (ref, fast):
            unfuse_experts(model.model.language_model.layers)
        for ref_layer, fast_layer in zip(ref.model.language_model.layers, fast.model.language_model.layers):
            for path, experts in experts_modules(ref_layer).items():
                packed = {"w13": [], "w2": []}
                for mlp in experts:
                    tensors = {}
                    for proj in ("gate_proj", "up_proj", "down_proj"):
                        lin = getattr(mlp, proj)
                        qw = quantize_rtn(lin.weight.data.float(), scheme, scale_dtype=dtype)
                        lin.weight.copy_(qw.dequantize(dtype))
                        tensors[proj] = (pack_rows(qw.codes, bits), qw.scale,
                                         None if sym else pack_columns(qw.zero, bits))
                    packed["w13"].append([tensors["gate_proj"], tensors["up_proj"]])
                    packed["w2"].append([tensors["down_proj"]])
                hidden, inter = experts[0].down_proj.weight.shape
                fused = FusedExperts(repack_experts(packed["w13"], bits, hidden, dtype),
                                     repack_experts(packed["w2"], bits, inter, dtype), bits)
                parent, _, attr = path.rpartition(".")
                setattr(fast_layer.get_submodule(parent), attr, fused)
    inputs = image_prompt(model_dir, device)
    with torch.no_grad():
        return ref(**inputs).logits.float(), fast(**inputs).logits.float()
