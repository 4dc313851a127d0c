"""A whole (tiny) quantized VLM whose decoder linears run through the plugin's kernel path on CUDA.

Checkpoint-layout tensors (packed with vlmptq's packer, as the writer stores them) go through the
plugin's kernel selection, ``prepare`` and ``apply`` (what ``VlmptqLinearMethod`` does inside
vLLM; vLLM itself is not on the GPU machine), and the model's logits on an image prompt must match
the same model with the dequantized weights in its ordinary nn.Linear layers
(``tests/support/kernel_model.py``; the CPU runs the same through the Triton interpreter).
"""

from __future__ import annotations

import pytest
import torch

from tests.support.kernel_model import logits_through_kernel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vlmptq.testing.tiny_vlm import build_tiny_qwen_vl

    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny"), "qwen2_vl")


@pytest.mark.parametrize("bits,group,sym", [(2, 32, False), (3, 64, False), (4, 64, True)])
def test_quantized_model_through_kernels_matches_dequantized_model(tiny, bits, group, sym):
    from vllm_plugin.kernels import choose_kernel

    a, b, chosen = logits_through_kernel(tiny, bits, group, sym, torch.bfloat16, "cuda", choose_kernel)
    assert chosen == {"triton"}
    assert torch.isfinite(b).all()
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 3e-2, rel  # bf16 rounding of activations through 2 layers; a wrong code gives > 0.3
