"""Host side of the fused low-bit mixture-of-experts path: routing alignment, expert repacking, launches, and
the ``vlmptq::wna16_moe`` op. Imports torch only (triton at the first launch), never vLLM.

``torch.ops.vlmptq.wna16_moe(x, topk_ids, topk_weights, w13_qweight, w13_sz, w2_qweight, w2_sz, bits,
activation)`` computes, for ``x [T, H]`` routed to ``k`` experts per token,

    out[t] = sum_j topk_weights[t, j] * W2_e @ (act(W1_e @ x[t]) * (W3_e @ x[t])),   e = topk_ids[t, j]

(act: SiLU, or tanh-approximated GELU for Gemma 4's experts; ``FUSED_ACTIVATIONS``)

in three steps: (1) :func:`route` sorts the ``R = T * k`` (token, slot) rows by expert into blocks of ``BLOCK_M``
rows of one expert each (on the device, no host synchronization: one Triton program up to 1024 rows, else
:func:`align_routed` in torch; skipped for a few rows, e.g. at decode, where every routed row is its own block:
:func:`sorts`); (2) the grouped Triton kernel (:func:`.kernels._moe_mma_kernel`) runs gate/up on the gathered
tokens with SiLU-and-multiply in its epilogue into ``[R, I]``, and down on those rows into ``[R, H]``, scaled by
the routing weights; (3) the ``k`` rows of a token are summed (torch). A decode step is three launches, a batch
of up to 128 tokens (top-8) four. Shapes are fixed by ``T``, ``k`` and ``E`` alone, so CUDA graphs capture it.

Layouts (``E`` experts, ``H`` hidden, ``I`` intermediate; per expert, the dense kernels' layout of
:mod:`.layout`):
    w13_qweight int32 [E, PLANES, 2I, U_H]     row 2j gate_proj row j, row 2j+1 up_proj row j; U_H = pad(H) / VPW
    w13_sz      int32 [E, pad(H) / ge, 2I]     (scale | zero << 16) words, group-major, rows interleaved alike
    w2_qweight  int32 [E, PLANES, H, U_I]
    w2_sz       int32 [E, pad(I) / ge, H]
(:func:`repack_experts` builds them from the checkpoint's per-expert compressed-tensors tensors.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from vllm_plugin.kernels.ops import register_op
from vllm_plugin.kernels.triton.configs import KernelConfig, default_dot_config, fit_smem, tuned_config
from vllm_plugin.kernels.triton.layout import repack
from vllm_plugin.kernels.triton.ops import KernelLaunch, _device_info, geometry, interpreting, triton_cdiv

# gated expert activations, act(gate) * up: the torch reference takes all, the fused kernel SiLU and tanh-GELU
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}
FUSED_ACTIVATIONS = ("silu", "gelu_tanh")
TUNED_PREFIX = "moe-"  # tuned-file keys of the MoE launches: moe-w<bits>g<ge>:<N>x<K>


# ----------------------------------------------------------------------------- routing
def block_capacity(rows: int, num_experts: int, block_m: int) -> int:
    """The most blocks :func:`align_routed` can fill: each expert that gets ``c`` rows fills ``ceil(c / BM)``
    blocks, so at most ``(R + min(E, R) * (BM - 1)) // BM`` and at most ``R`` (a shape-only bound)."""
    return max(1, min(rows, (rows + min(num_experts, rows) * (block_m - 1)) // block_m))


def align_routed(topk_ids: torch.Tensor, num_experts: int, block_m: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the routed rows by expert, padded per expert to whole blocks of ``block_m``.

    ``topk_ids [T, k]`` -> (``rows`` int32 ``[C * BM]``: row ``r = t * k + j`` of each routed (token, slot),
    expert by expert, in token order within an expert, padded with ``R = T * k``; ``block_expert`` int32
    ``[C]``: the expert of each block; ``nblocks`` int32 ``[1]``: how many blocks are real), ``C`` from
    :func:`block_capacity`. Device ops only (no host synchronization): CUDA-graph safe."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    r, dev = flat.numel(), flat.device
    cap = block_capacity(r, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)  # rows grouped by expert, token order inside
    expert = flat[order]
    rank = torch.arange(r, device=dev) - (torch.cumsum(counts, 0) - counts)[expert]  # position within its expert
    rows = torch.full((cap * block_m,), r, dtype=torch.int32, device=dev)
    rows.scatter_(0, (ends - padded)[expert] + rank, order.to(torch.int32))
    block_ends = ends // block_m
    block_expert = torch.searchsorted(block_ends, torch.arange(cap, device=dev), right=True)
    block_expert = block_expert.clamp_(max=num_experts - 1).to(torch.int32)
    return rows, block_expert, block_ends[-1:].to(torch.int32)


ALIGN_KERNEL_MAX_ROWS = 1024  # up to this many routed rows one Triton program aligns them (one launch, not ~25)


def plan_align_launch(topk_ids: torch.Tensor, num_experts: int, block_m: int
                      ) -> tuple[KernelLaunch, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`align_routed` as one Triton launch (:func:`.kernels._moe_align_kernel`, a single program: for a
    few hundred rows, e.g. batched decode), and its outputs once it ran (``rows`` beyond the real blocks
    unwritten)."""
    from vllm_plugin.kernels.triton import kernels as K_

    flat = topk_ids.reshape(-1)
    r, dev = flat.numel(), flat.device
    cap = block_capacity(r, num_experts, block_m)
    out = (torch.empty((cap * block_m,), dtype=torch.int32, device=dev),
           torch.empty((cap,), dtype=torch.int32, device=dev), torch.empty((1,), dtype=torch.int32, device=dev))
    ep = 1 << max(4, (num_experts - 1).bit_length())
    meta = dict(EP=ep, BLOCK_M=block_m, CHUNK=min(256, max(16, 4096 // ep)), num_warps=4, num_stages=1)
    return KernelLaunch(K_._moe_align_kernel, (1,), (flat, *out, r, num_experts, cap), meta), out


def route(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`align_routed`'s blocks: one Triton launch for up to :data:`ALIGN_KERNEL_MAX_ROWS` rows on a GPU (or
    in the interpreter), the torch version (about 25 small kernels, parallel) beyond."""
    if topk_ids.numel() <= ALIGN_KERNEL_MAX_ROWS and (topk_ids.is_cuda or interpreting()):
        launch, out = plan_align_launch(topk_ids, num_experts, block_m)
        launch.run()
        return out
    return align_routed(topk_ids, num_experts, block_m)


# ----------------------------------------------------------------------------- weights
def repack_experts(
    experts: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]],
    bits: int, in_features: int, act_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert, its projections' checkpoint tensors ``(weight_packed, weight_scale, weight_zero_point)``
    (one shard, e.g. down; or gate and up, whose rows are interleaved: gate row j at 2j, up row j at 2j + 1)
    -> the stacked kernel layout (``qweight [E, PLANES, N, U]``, ``sz [E, G, N]``), filled expert by expert
    into tensors allocated once (load-time memory: the layout plus one expert's shards)."""
    qweight = sz = None
    for e, shards in enumerate(experts):
        parts = [repack(wp, s, z, bits, in_features, act_dtype)[:2] for wp, s, z in shards]
        if len(parts) not in (1, 2) or len({p[0].shape for p in parts}) != 1:
            raise ValueError(f"expert {e}: expected one projection or gate and up of one shape, got "
                             f"{[tuple(p[0].shape) for p in parts]}")
        q = torch.stack([p[0] for p in parts], dim=2).flatten(1, 2)  # [PLANES, N, (shard), U]
        g = torch.stack([p[1] for p in parts], dim=2).flatten(1, 2)  # [G, N, (shard)]
        if qweight is None:
            qweight = q.new_empty((len(experts), *q.shape))
            sz = g.new_empty((len(experts), *g.shape))
        qweight[e].copy_(q)
        sz[e].copy_(g)
    if qweight is None:
        raise ValueError("no experts to repack")
    return qweight, sz


# ----------------------------------------------------------------------------- launches
@functools.lru_cache(maxsize=4096)
def moe_config(device: str, bits: int, group: int, n: int, k: int, rows_per_expert: int) -> KernelConfig:
    """Launch of one grouped GEMM: tuned (``moe-w<b>g<ge>:<N>x<K>`` keys, M bucket = the average routed rows
    per active expert) or the dense kernel's tile for that many rows (a "dot" tile: the grouped kernel has no
    dequantize path)."""
    name, _, arch = _device_info(device)
    tuned = tuned_config(name, bits, group, n, k, rows_per_expert, prefix=TUNED_PREFIX)
    if tuned is None:
        return default_moe_config(bits, rows_per_expert, arch)
    return fit_smem(replace(tuned, programs=0), bits, arch)


def default_moe_config(bits: int, rows_per_expert: int, arch: int) -> KernelConfig:
    """The untuned launch: the dense kernel's "dot" tile for that many rows (up to 256), fitted to the card."""
    return fit_smem(replace(default_dot_config(bits, min(rows_per_expert, 256), arch), programs=0), bits, arch)


def sorts(rows: int, num_experts: int, top_k: int) -> bool:
    """Whether :func:`fused_moe` aligns ``rows`` routed rows by expert: not for a few rows (decode), where
    alignment's kernels would cost more than the experts two tokens share (expected share of rows whose expert
    another row also has: about rows / (2 E) <= 1/8 below the threshold)."""
    return rows > max(top_k, num_experts // 4)


def rows_per_expert(rows: int, num_experts: int, sort: bool) -> int:
    """The M bucket of a call's launch configs (and of the ``moe-`` tuned keys): the routed rows per active expert
    if every expert a row could reach got its share (1 when unsorted: each row is its own block)."""
    return triton_cdiv(rows, min(num_experts, rows)) if sort else 1


def plan_moe_launch(x, qweight, sz, out, rows, block_expert, nblocks, weights, row_div: int, bits: int,
                    cfg: KernelConfig, sort: bool = True, gated: bool = False, activation: str = "silu"
                    ) -> KernelLaunch:
    """The grouped launch ``out[r] = dequant(W_e) x[r // row_div]`` (times ``weights[r]`` if given) for the
    aligned ``rows`` (:func:`align_routed` with ``cfg.block_m``); ``sort`` False: one block per routed row, expert
    ``block_expert[r]`` (the flat routing; ``rows`` and ``nblocks`` unused); ``gated``: W holds interleaved
    gate/up rows and ``out [R, N / 2]`` gets ``activation(gate) * up`` (one of ``FUSED_ACTIVATIONS``). Allocates
    nothing (meta tensors work)."""
    from vllm_plugin.kernels.triton import kernels as K_

    n, k = qweight.shape[2], x.shape[1]
    geo = geometry(bits, k, qweight[0], sz[0])
    grid = (block_expert.shape[0], triton_cdiv(n, cfg.block_n))
    args = (x, qweight, sz, out, rows, block_expert, nblocks, weights if weights is not None else out,
            out.shape[0], n, k, geo["U"], sz.shape[1], row_div)
    meta = dict(BITS=bits, PLANES=geo["PLANES"], BK=geo["BK"], GPB=geo["GPB"], TPG=geo["TPG"], BLOCK_N=cfg.block_n,
                BLOCK_M=cfg.block_m, MUL_WEIGHT=weights is not None, GATED=gated, SORTED=sort, EVEN_K=geo["EVEN_K"],
                GELU=gated and activation == "gelu_tanh",
                INTERPRET=interpreting(),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
    return KernelLaunch(K_._moe_mma_kernel, grid, args, meta)


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13_qweight: torch.Tensor,
              w13_sz: torch.Tensor, w2_qweight: torch.Tensor, w2_sz: torch.Tensor, bits: int, activation: str,
              configs: Optional[tuple[KernelConfig, KernelConfig]] = None, sort: Optional[bool] = None
              ) -> torch.Tensor:
    """``x [T, H]`` through its routed experts (module docstring) -> ``[T, H]`` in x's dtype. ``configs``:
    the (gate/up, down) launches (both must have the same ``block_m``); None: :func:`moe_config`'s. ``sort``:
    align the rows by expert (None: :func:`sorts`' choice); unsorted, each routed row is its own block, which
    costs no alignment kernels and re-reads an expert routed from several tokens."""
    t, h = x.shape
    e, _, n13, _ = w13_qweight.shape
    inter = n13 // 2
    top_k = topk_ids.shape[1]
    r = t * top_k
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"the fused MoE kernel computes {' / '.join(FUSED_ACTIVATIONS)}(gate) * up, not {activation}")
    if t == 0:
        return torch.empty_like(x)
    sort = sorts(r, e, top_k) if sort is None else sort
    if configs is None:
        per_expert = rows_per_expert(r, e, sort)
        dev = str(x.device)
        c13 = moe_config(dev, bits, geometry(bits, h, w13_qweight[0], w13_sz[0])["group"], n13, h, per_expert)
        c2 = moe_config(dev, bits, geometry(bits, inter, w2_qweight[0], w2_sz[0])["group"], h, inter, per_expert)
        configs = (c13, replace(c2, block_m=c13.block_m))
    c13, c2 = configs
    if c13.block_m != c2.block_m:
        raise ValueError(f"the two grouped GEMMs share one row alignment: block_m {c13.block_m} != {c2.block_m}")
    if sort:
        rows, block_expert, nblocks = route(topk_ids, e, c13.block_m)
    else:
        block_expert = topk_ids.reshape(-1)
        rows = nblocks = block_expert  # unused
    hidden = torch.empty((r, inter), dtype=x.dtype, device=x.device)
    plan_moe_launch(x.contiguous(), w13_qweight, w13_sz, hidden, rows, block_expert, nblocks, None, top_k, bits,
                    c13, sort, gated=True, activation=activation).run()
    down = torch.empty((r, h), dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    plan_moe_launch(hidden, w2_qweight, w2_sz, down, rows, block_expert, nblocks, weights, 1, bits, c2, sort).run()
    return down.view(t, top_k, h).sum(dim=1)


def _wna16_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13_qweight: torch.Tensor,
               w13_sz: torch.Tensor, w2_qweight: torch.Tensor, w2_sz: torch.Tensor, bits: int,
               activation: str) -> torch.Tensor:
    """The fused routed experts of :func:`fused_moe` with the configured launches."""
    return fused_moe(x, topk_ids, topk_weights, w13_qweight, w13_sz, w2_qweight, w2_sz, bits, activation)


def _wna16_moe_fake(x, topk_ids, topk_weights, w13_qweight, w13_sz, w2_qweight, w2_sz, bits, activation):
    return torch.empty_like(x)


wna16_moe = register_op("wna16_moe", _wna16_moe, _wna16_moe_fake)


# ----------------------------------------------------------------------------- first-use check
# (run through vllm_plugin.kernels.triton.selfcheck.self_check(..., kernel="triton_moe"), which caches and logs)


def random_experts(num_experts: int, hidden: int, inter: int, bits: int, group_size: Optional[int],
                   act_dtype: torch.dtype, gen: torch.Generator, symmetric: bool = False) -> dict:
    """Random checkpoint tensors of ``num_experts`` gated experts (``{"w13": [[gate, up], ...], "w2": [[down],
    ...]}`` of ``(weight_packed, weight_scale, weight_zero_point)``) on ``gen``'s device, for checks and
    benchmarks."""
    from vlmptq.checkpoint.packing import pack_columns, pack_rows

    on = dict(generator=gen, device=gen.device)

    def proj(n: int, k: int):
        g = k if group_size is None else group_size
        codes = torch.randint(0, 2**bits, (n, k), **on)
        scale = ((torch.rand(n, k // g, **on) + 0.5) * 2.0 / (k**0.5 * 2**bits)).to(act_dtype)
        zp = None if symmetric else pack_columns(torch.randint(0, 2**bits, (n, k // g), **on), bits)
        return pack_rows(codes, bits), scale, zp

    return {"w13": [[proj(inter, hidden), proj(inter, hidden)] for _ in range(num_experts)],
            "w2": [[proj(hidden, inter)] for _ in range(num_experts)]}


def reference_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: dict, bits: int,
                  activation: str) -> torch.Tensor:
    """The routed experts of :func:`random_experts`' layout in fp32 torch (dequantized weights; transformers' loop,
    :func:`vlmptq.models.experts.mix_routed`), on x's device."""
    from vlmptq.models.experts import mix_routed
    from vllm_plugin.kernels.reference import dequantize_packed

    hidden, inter = x.shape[1], experts["w13"][0][0][1].shape[0]  # gate_proj's rows

    def dense(t, k):
        wp, s, z = (None if v is None else v.to(x.device) for v in t)
        return dequantize_packed(wp, s.float(), z, bits, k)

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = (rows @ dense(p, hidden).t() for p in experts["w13"][e])
        return (ACTIVATIONS[activation](gate) * up) @ dense(experts["w2"][e][0], inter).t()

    return mix_routed(x.float(), topk_ids, topk_weights.float(), len(experts["w2"]), expert)


def check_fused_moe(bits: int, group_size: Optional[int], act_dtype: torch.dtype, device: torch.device, tol: float
                    ) -> Optional[str]:
    """The fused path's first-use check (:mod:`.selfcheck`): None, or why it is wrong here. 6 experts, top-2, at
    1, 5 and 300 tokens (unsorted rows, partly filled blocks, blocks of 64+ rows with the scales in the tile) with
    SiLU, and 5 tokens with tanh-GELU."""
    hidden, inter, num_experts = (256, 384, 6) if group_size is None else (4 * group_size, 6 * group_size, 6)
    gen = torch.Generator().manual_seed(7 * bits + (group_size or 0))
    experts = random_experts(num_experts, hidden, inter, bits, group_size, act_dtype, gen)
    w13 = repack_experts([[tuple(None if v is None else v.to(device) for v in p) for p in ps] for ps in experts["w13"]],
                         bits, hidden, act_dtype)
    w2 = repack_experts([[tuple(None if v is None else v.to(device) for v in p) for p in ps] for ps in experts["w2"]],
                        bits, inter, act_dtype)
    for tokens, activation in ((1, "silu"), (5, "silu"), (300, "silu"), (5, "gelu_tanh")):
        x = torch.randn(tokens, hidden, generator=gen).to(act_dtype)
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:2] for _ in range(tokens)])
        weights = torch.softmax(torch.randn(tokens, 2, generator=gen), dim=-1)
        y = torch.ops.vlmptq.wna16_moe(x.to(device), ids.to(device), weights.to(device), *w13, *w2, bits, activation)
        y = y.float().cpu()
        if not torch.isfinite(y).all():
            return f"non-finite output at T = {tokens} ({activation})"
        ref = reference_moe(x, ids, weights, experts, bits, activation)
        err = ((y - ref).norm() / ref.norm()).item()
        if not err < tol:
            return f"relative error {err:.3g} at T = {tokens} ({activation}; a correct kernel stays below {tol:g})"
    return None
