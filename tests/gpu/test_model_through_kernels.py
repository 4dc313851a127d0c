"""A whole (tiny) quantized VLM whose decoder linears run through the plugin's kernel path on CUDA.

Checkpoint-layout tensors (packed with vlmptq's packer, as the writer stores them) go through the
plugin's kernel selection, ``prepare`` and ``apply`` (what ``VlmptqLinearMethod`` does inside
vLLM; vLLM itself is not on the GPU machine), and the model's logits on an image prompt must match
the same model with the dequantized weights in its ordinary nn.Linear layers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class _KernelLinear(nn.Module):
    """An nn.Linear stand-in holding kernel-prepared tensors (the plugin's linear-method path)."""

    def __init__(self, kernel, tensors, bias):
        super().__init__()
        self.kernel, self.tensors, self.bias = kernel, tensors, bias

    def forward(self, x):
        return self.kernel.apply(self.tensors, x, self.bias)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vlmptq.testing.tiny_vlm import build_tiny_qwen_vl

    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny"), "qwen2_vl")


@pytest.mark.parametrize("bits,group,sym", [(2, 32, False), (3, 64, False), (4, 64, True)])
def test_quantized_model_through_kernels_matches_dequantized_model(tiny, bits, group, sym):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmptq.checkpoint.packing import pack_columns, pack_rows
    from vlmptq.quant.grid import quantize_rtn
    from vlmptq.quant.scheme import WeightScheme
    from vllm_plugin.kernels import choose_kernel
    from vllm_plugin.kernels.base import WNA16LayerConfig

    scheme = WeightScheme(bits, group, sym)
    ref = AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.bfloat16).cuda().eval()
    fast = AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.bfloat16).cuda().eval()
    chosen = set()
    with torch.no_grad():
        for name, mod in list(ref.named_modules()):
            if not (isinstance(mod, nn.Linear) and ".language_model.layers." in name):
                continue
            qw = quantize_rtn(mod.weight.data.float(), scheme, scale_dtype=torch.bfloat16)
            mod.weight.copy_(qw.dequantize(torch.bfloat16))
            n, k = mod.weight.shape
            cfg = WNA16LayerConfig(bits, group, sym, k, n, torch.bfloat16, "cuda")
            kernel = choose_kernel(cfg, name)(cfg)
            chosen.add(kernel.name)
            tensors = kernel.prepare(pack_rows(qw.codes.cuda(), bits), qw.scale.cuda(),
                                     None if sym else pack_columns(qw.zero.cuda(), bits))
            parent, child = name.rsplit(".", 1)
            bias = fast.get_submodule(name).bias
            setattr(fast.get_submodule(parent), child, _KernelLinear(kernel, tensors, bias))
    assert chosen == {"triton"}
    processor = AutoProcessor.from_pretrained(tiny)
    import numpy as np
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((100, 150, 3)) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = {k: v.cuda() for k, v in processor(text=[text], images=[image], return_tensors="pt").items()}
    with torch.no_grad():
        a = ref(**inputs).logits.float()
        b = fast(**inputs).logits.float()
    assert torch.isfinite(b).all()
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 3e-2, rel  # bf16 rounding of activations through 2 layers; a wrong code gives > 0.3
