"""Host side of the Triton kernels: launch geometry, dispatch by M, the ``vlmptq::wna16_gemm`` op.

``torch.ops.vlmptq.wna16_gemm(x, qweight, sz, bias, locks, bits, out_features)`` is a torch operator
(:func:`vllm_plugin.kernels.ops.register_op`) with a fake (meta) implementation, so torch.compile traces through it
and CUDA graphs capture it: the launch depends on shapes only (config lookup is cached), it never
synchronizes with the host, and its only allocations (output, stream-K workspace, the dequantized
weight of the prefill path) have shape-determined sizes.
"""

import functools
import logging
import os
from dataclasses import replace
from typing import Callable, Optional

import torch

from vllm_plugin.kernels.ops import register_op
from vllm_plugin.kernels.triton.configs import GEMV_MAX_M, HOPPER, KernelConfig, fit_smem, select_config
from vllm_plugin.kernels.triton.layout import SUB, TILE, block_values, planes
from vlmptq.triton_launch import TritonLaunch as KernelLaunch  # what _launch runs and .aot compiles

logger = logging.getLogger(__name__)

LOCKS_SIZE = 1 << 16  # stream-K tile counters per device (each launch returns them to 0)
PROGRAMS_PER_SM = 2  # persistent MMA programs per SM unless a config says otherwise
GEMV_PROGRAMS_PER_SM = 4  # what the "gemv" launch's K split aims for unless a config says otherwise
_LOCKS: dict[str, torch.Tensor] = {}


def get_locks(device: torch.device) -> torch.Tensor:
    """The zeroed int32 counter buffer shared by every layer on ``device`` (allocate at load time)."""
    key = str(device)
    if key not in _LOCKS:
        _LOCKS[key] = torch.zeros(LOCKS_SIZE, dtype=torch.int32, device=device)
    return _LOCKS[key]


@functools.lru_cache(maxsize=None)
def _device_info(device: str) -> tuple[str, int, int]:
    """(name, multiprocessor count, compute capability x 10) of a device string; a device that is not
    a GPU ('cpu' under the Triton interpreter, 'meta' for ahead-of-time compiles) counts as an H100."""
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return props.name, props.multi_processor_count, 10 * props.major + props.minor
    return dev.type, 132, HOPPER


@functools.lru_cache(maxsize=4096)
def _config_for(device: str, bits: int, group: int, n: int, k: int, m: int) -> KernelConfig:
    name, _, arch = _device_info(device)
    return select_config(name, bits, group, n, k, m, arch)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def geometry(bits: int, k: int, qweight: torch.Tensor, sz: torch.Tensor) -> dict:
    """Layout constants the kernels take, read off the repacked tensors' shapes (see .layout)."""
    u = qweight.shape[2]
    bk = block_values(bits)
    nblk = u // SUB
    group = nblk * bk // sz.shape[0]
    return dict(U=u, nblk=nblk, BK=bk, GPB=bk // group, TPG=group // TILE, group=group,
                EVEN_K=(k == nblk * bk), PLANES=planes(bits))


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (no inline PTX: see kernels._packed_fma)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def stream_k(tiles: int, nblk: int, programs: int, out_elems: int) -> tuple[int, int]:
    """(programs, workspace slots) of the persistent MMA launch: at most one program per iteration;
    the slots a tile can need = the most programs one tile's ``nblk`` iterations can touch. One
    program per tile (no sharing) when the counters or int32 workspace offsets would not suffice."""
    iters = tiles * nblk
    g = max(1, min(programs, iters))
    q = iters // g  # every program runs q or q + 1 iterations
    slots = 1 if iters % g == 0 and q % nblk == 0 else min(g, 1 + (nblk - 1 + q - 1) // q)
    if slots > 1 and (tiles > LOCKS_SIZE or slots * out_elems >= 2**31):
        return tiles, 1
    return g, slots


def launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    sz: torch.Tensor,
    bias: Optional[torch.Tensor],
    locks: torch.Tensor,
    bits: int,
    out_features: int,
    cfg: Optional[KernelConfig] = None,
) -> torch.Tensor:
    """``x [M, K]`` (contiguous) -> ``[M, N]`` in x's dtype.

    ``cfg`` given: launch exactly that (errors propagate; benchmarks and tests). ``cfg`` None: the
    tuned/default config for the shape; if it fails to *compile* (e.g. shared memory on a smaller
    GPU), simpler configs are tried once and the first that works is remembered for the shape.
    """
    m, k = x.shape
    geo = geometry(bits, k, qweight, sz)
    if cfg is not None:
        return _launch(x, qweight, sz, bias, locks, bits, out_features, cfg, geo)
    key = (str(x.device), bits, geo["group"], out_features, k, m)
    cfg = _RESOLVED.get(key) or _config_for(*key)
    if key in _RESOLVED:
        return _launch(x, qweight, sz, bias, locks, bits, out_features, cfg, geo)
    last: Exception | None = None
    for attempt in [cfg] + _fallbacks(cfg, m):
        try:
            out = _launch(x, qweight, sz, bias, locks, bits, out_features, attempt, geo)
        except Exception as e:  # only compile-time failures fall through to the next config
            if not _is_compile_failure(e):
                raise
            logger.warning("vlmptq triton: config %s failed to compile for w%d N=%d K=%d M=%d (%s: %s); "
                           "trying a simpler one", attempt.to_dict(), bits, out_features, k, m,
                           type(e).__name__, str(e)[:200])
            last = e
            continue
        _RESOLVED[key] = attempt
        return out
    raise RuntimeError(f"no Triton config compiles for w{bits} N={out_features} K={k} M={m}") from last


_RESOLVED: dict[tuple, KernelConfig] = {}


def _is_compile_failure(e: Exception) -> bool:
    name = type(e).__name__
    text = str(e)
    return (name in ("OutOfResources", "CompilationError", "CompileTimeAssertionFailure")
            or "PassManager" in text or "out of resource" in text.lower())


def _fallbacks(cfg: KernelConfig, m: int) -> list[KernelConfig]:
    """Simpler configs to try, in order, when ``cfg`` does not compile."""
    out = []
    if cfg.path == "gemv" and cfg.num_stages > 1:
        out.append(replace(cfg, num_stages=1))
    if cfg.path == "dot":
        if cfg.num_stages > 1:
            out.append(replace(cfg, num_stages=1))
        if cfg.block_m > 16 or cfg.block_n > 64:
            out.append(replace(cfg, block_m=16 if m <= 16 else 32, block_n=64, num_warps=4, num_stages=1))
    if cfg.path != "dequant":
        out.append(KernelConfig("dequant", block_n=32))
    return out


def gemv_split(n_tiles: int, nblk: int, programs: int) -> tuple[int, int]:
    """(K splits, layout blocks per split) of the "gemv" launch: about ``programs`` programs over ``n_tiles``
    row tiles, no split empty; no split (one program per tile) when the stream-K counters would not suffice."""
    want = max(1, min(nblk, round(programs / n_tiles)))
    if want > 1 and n_tiles > LOCKS_SIZE:
        want = 1
    bps = -(-nblk // want)
    return -(-nblk // bps), bps


def plan_launch(x, qweight, sz, bias, locks, bits: int, n: int, cfg: KernelConfig, geo: dict,
                arch: Optional[int] = None, sms: Optional[int] = None
                ) -> tuple[KernelLaunch, Callable[[], torch.Tensor]]:
    """(the kernel launch, a function giving the output once it ran) for ``cfg``. Allocates the
    output and workspaces on x's device (the meta device works: nothing is read or written);
    ``arch`` (compute capability x 10) and ``sms`` (multiprocessors) default to x's device's, so an
    ahead-of-time compile can plan for a card it does not have."""
    from vllm_plugin.kernels.triton import kernels as K_

    m, k = x.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # enable_fp_fusion: the per-chunk scale is one FFMA on the fp32 accumulators, whatever Triton's
    # default (it turns fusion off from 3.10 unless asked)
    common = dict(BITS=bits, PLANES=geo["PLANES"], BK=geo["BK"], GPB=geo["GPB"], TPG=geo["TPG"],
                  INTERPRET=interpreting(), enable_fp_fusion=True)
    if cfg.path == "dequant":
        w = torch.empty((n, k), dtype=x.dtype, device=x.device)
        grid = (triton_cdiv(n, cfg.block_n), geo["nblk"])
        meta = dict(BLOCK_N=cfg.block_n, EVEN_K=geo["EVEN_K"], num_warps=cfg.num_warps, num_stages=1, **common)
        launch_ = KernelLaunch(K_._dequant_kernel, grid, (qweight, sz, w, n, k, geo["U"]), meta)
        return launch_, lambda: torch.nn.functional.linear(x, w, bias)
    _, device_sms, device_arch = _device_info(str(x.device))
    sms = device_sms if sms is None else sms
    if cfg.path == "gemv":
        if m > GEMV_MAX_M:
            raise ValueError(f"the 'gemv' path takes at most {GEMV_MAX_M} activation rows, got {m}")
        if x.data_ptr() % 4:  # the kernel reads x as int32 pairs: a view starting mid-word gets copied
            x = x.clone()
        n_tiles = triton_cdiv(n, cfg.block_n)
        splits, bps = gemv_split(n_tiles, geo["nblk"], cfg.programs or sms * GEMV_PROGRAMS_PER_SM)
        ws = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
        b = bias if bias is not None else out
        args = (x, qweight, sz, b, out, ws, locks, m, n, k, geo["U"], bps)
        meta = dict(HAS_BIAS=bias is not None, EVEN_K=geo["EVEN_K"], num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages, BLOCK_N=cfg.block_n, **common)
        return KernelLaunch(K_._gemv_kernel, (n_tiles, splits), args, meta), lambda: out
    cfg = fit_smem(cfg, bits, device_arch if arch is None else arch)
    n_tiles = triton_cdiv(n, cfg.block_n)
    tiles = n_tiles * triton_cdiv(m, cfg.block_m)
    programs = cfg.programs or sms * PROGRAMS_PER_SM
    g, slots = stream_k(tiles, geo["nblk"], programs, m * n)
    ws = torch.empty((slots, m, n), dtype=torch.float32, device=x.device) if slots > 1 else out
    b = bias if bias is not None else out
    args = (x, qweight, sz, b, out, ws, locks, m, n, k, geo["U"], n_tiles, tiles * geo["nblk"])
    meta = dict(HAS_BIAS=bias is not None, EVEN_K=geo["EVEN_K"], num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, **common)
    launch_ = KernelLaunch(K_._mma_kernel, (g,), args, meta)
    return launch_, lambda: out


def _launch(x, qweight, sz, bias, locks, bits: int, n: int, cfg: KernelConfig, geo: dict) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.empty((0, n), dtype=x.dtype, device=x.device)
    launch_, result = plan_launch(x, qweight, sz, bias, locks, bits, n, cfg, geo)
    launch_.run()
    return result()


def _wna16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    sz: torch.Tensor,
    bias: Optional[torch.Tensor],
    locks: torch.Tensor,
    bits: int,
    out_features: int,
) -> torch.Tensor:
    """``x [M, K] @ dequant(W).T + bias`` on the Triton layout (``locks`` is left as it was found)."""
    return launch(x.contiguous(), qweight, sz, bias, locks, bits, out_features)


def _wna16_gemm_fake(x, qweight, sz, bias, locks, bits, out_features):
    return x.new_empty((x.shape[0], out_features))


# ``torch.ops.vlmptq.wna16_gemm``: the plugin's lean registration (torch.library.custom_op would add
# ~10 us of Python per call, paid by every eager / prefill call outside CUDA graphs)
wna16_gemm = register_op("wna16_gemm", _wna16_gemm, _wna16_gemm_fake)
