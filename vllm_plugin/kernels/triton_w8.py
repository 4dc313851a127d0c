"""Triton W8A16 GEMM for 8-bit vlmptq layers (an 8-bit ``lm_head`` above all), group-wise or per-channel.

Checkpoint layout handed to :meth:`TritonW8A16Kernel.prepare` (see :mod:`vllm_plugin.kernels.base`):
    weight_packed      int32 [N, K/4]   four codes per word along K, little end first
    weight_scale       act dtype [N, G]
    weight_zero_point  int32 [ceil(N/4), G] packed along N; None for symmetric (z = 128)
Kernel layout (what ``prepare`` returns; kernels in :mod:`vllm_plugin.kernels.triton.w8`):
    qweight  int32 [N, K/4]      ``weight_packed`` unchanged
    scale    act dtype [N, G]
    zero     act dtype [N, G]    unpacked zero points (exact: integers 0..255)
Dispatch by M: fused dequant + ``tl.dot`` with a K split for M <= 64, dequantize + cuBLAS above
(shapes from the GPU's tuned file, ``w8...`` keys, else heuristics). ``torch.ops.vlmptq.w8_gemm`` is a custom op with a fake implementation:
shape-determined allocations only, no host synchronization (CUDA-graph safe).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Optional

import torch

from vllm_plugin.kernels.base import WNA16Kernel, WNA16LayerConfig
from vllm_plugin.kernels.ops import register_op


@functools.lru_cache(maxsize=4096)
def _w8_config_for(device: str, group: int, n: int, k: int, m: int, sms: Optional[int], arch: Optional[int]):
    """The GPU's tuned ``W8Config`` for this shape, else the heuristic (``sms`` / ``arch``: override
    the device's, for ahead-of-time compiles on meta tensors)."""
    from vllm_plugin.kernels.triton.configs import tuned_config
    from vllm_plugin.kernels.triton.ops import _device_info
    from vllm_plugin.kernels.triton.w8 import w8_config

    name, dev_sms, dev_arch = _device_info(device)
    return tuned_config(name, 8, group, n, k, m) or w8_config(m, n, k, group, sms or dev_sms, arch or dev_arch)


def plan_w8_launch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bias: Optional[torch.Tensor], cfg=None, sms: Optional[int] = None, arch: Optional[int] = None):
    """(the kernel launch, a function giving the output once it ran) for ``x [M, K]``. The shape:
    ``cfg`` (a ``W8Config``) if given, else the GPU's tuned file entry, else the heuristic for ``sms``
    SMs of compute capability ``arch`` x 10 (default: x's device). Allocates on x's device (meta
    works: ahead-of-time compiles plan with it)."""
    import triton.language as tl

    from vllm_plugin.kernels.triton import w8 as W
    from vllm_plugin.kernels.triton.ops import KernelLaunch, interpreting

    m, k = x.shape
    n, groups = scale.shape
    group = k // groups
    act = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[x.dtype]
    cfg = cfg or _w8_config_for(str(x.device), group, n, k, m, sms, arch)
    cfg.check(group, k)
    meta = dict(ACT=act, GROUP=group, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    if cfg.path == "dequant":
        w = torch.empty((n, k), dtype=x.dtype, device=x.device)
        grid = (-(-n // cfg.block_n), -(-k // cfg.block_k))
        launch = KernelLaunch(W._w8_dequant_kernel, grid, (qweight, scale, zero, w, n, k, groups),
                              dict(meta, num_stages=1))
        return launch, lambda: torch.nn.functional.linear(x, w, bias)
    k_per_split = -(-k // (cfg.split_k * cfg.block_k)) * cfg.block_k
    split = -(-k // k_per_split)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    dst = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (-(-n // cfg.block_n), -(-m // cfg.block_m), split)
    args = (x, qweight, scale, zero, bias if bias is not None else out, dst, m, n, k, groups, k_per_split)
    # per-channel: one group per row whatever K; as a multiple of the K tile the fused kernel scales
    # the dot's result (k0 // GROUP is 0 for every tile) instead of looking the scale up per word
    if groups == 1:
        meta["GROUP"] = -(-k // cfg.block_k) * cfg.block_k
    launch = KernelLaunch(W._w8_mma_kernel, grid, args,
                          dict(meta, HAS_BIAS=bias is not None, SPLIT=split, BLOCK_M=cfg.block_m,
                               INTERPRET=interpreting(), num_stages=cfg.num_stages))

    def result() -> torch.Tensor:
        if split == 1:
            return out
        acc = dst.sum(0)  # fixed order: deterministic
        if bias is not None:
            acc += bias.float()
        return acc.to(x.dtype)

    return launch, result


def w8_launch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              bias: Optional[torch.Tensor], cfg=None) -> torch.Tensor:
    """``x [M, K]`` (contiguous, act dtype) -> ``[M, N]``."""
    if x.shape[0] == 0:
        return torch.empty((0, scale.shape[0]), dtype=x.dtype, device=x.device)
    launch, result = plan_w8_launch(x, qweight, scale, zero, bias, cfg)
    launch.run()
    return result()


def _w8_gemm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x [M, K] @ dequant(W).T + bias`` on the W8 layout."""
    return w8_launch(x.contiguous(), qweight, scale, zero, bias)


def _w8_gemm_fake(x, qweight, scale, zero, bias):
    return x.new_empty((x.shape[0], scale.shape[0]))


# ``torch.ops.vlmptq.w8_gemm`` (the plugin's lean registration: no custom_op per-call overhead)
w8_gemm = register_op("w8_gemm", _w8_gemm, _w8_gemm_fake)


def prepare_w8(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None,
               in_features: int, act_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> the W8 kernel's (layout in the module docstring)."""
    from vlmptq.checkpoint.packing import unpack_columns

    n, groups = weight_scale.shape
    if tuple(weight_packed.shape) != (n, in_features // 4):
        raise ValueError(f"weight_packed has shape {tuple(weight_packed.shape)}, expected {(n, in_features // 4)} "
                         f"(8-bit codes, four per int32 word)")
    if weight_zero_point is None:
        zero = torch.full((n, groups), 128.0, dtype=act_dtype, device=weight_scale.device)
    else:
        zero = unpack_columns(weight_zero_point, 8, n).to(act_dtype)
    return {"qweight": weight_packed.contiguous(), "scale": weight_scale.to(act_dtype).contiguous(),
            "zero": zero.contiguous()}


class TritonW8A16Kernel(WNA16Kernel):
    """Fused dequant + GEMM in Triton for 8-bit weights on CUDA GPUs (the 2/3/4-bit kernel's layout
    cannot hold 8-bit codes)."""

    name = "triton_w8"

    @classmethod
    def can_implement(cls, config: WNA16LayerConfig) -> tuple[bool, str | None]:
        from vllm_plugin.kernels.triton_wna16 import triton_verdict

        reasons = [] if config.bits == 8 else [f"{config.bits}-bit weights (takes 8)"]
        if config.in_features % 4:
            reasons.append(f"in_features {config.in_features} is not a multiple of 4 (whole int32 words)")
        return triton_verdict(cls.name, config, reasons)

    def prepare(self, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                weight_zero_point: torch.Tensor | None) -> dict[str, torch.Tensor]:
        c = self.config
        if tuple(weight_scale.shape) != (c.out_features, c.num_groups):
            raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}, expected "
                             f"{(c.out_features, c.num_groups)} (out_features, in_features // group_size)")
        return prepare_w8(weight_packed, weight_scale, weight_zero_point, c.in_features, c.act_dtype)

    def apply(self, tensors: Mapping[str, torch.Tensor], x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if x.dtype != c.act_dtype:
            raise TypeError(f"activations are {x.dtype} but the layer was prepared for {c.act_dtype}")
        lead = x.shape[:-1]
        out = torch.ops.vlmptq.w8_gemm(x.reshape(-1, c.in_features), tensors["qweight"], tensors["scale"],
                                       tensors["zero"], bias)
        return out.view(*lead, c.out_features)
