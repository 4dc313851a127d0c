"""Triton W2/W3/W4 A16 kernels (see :mod:`vllm_plugin.kernels.triton_wna16` for the layouts).

``layout`` and ``configs`` import torch only; ``kernels`` and ``ops`` import triton.
"""
