"""Launch configurations: tuned per GPU in JSON files, sensible defaults otherwise.

Files: ``vllm_plugin/kernels/configs/<gpu>.json`` (``<gpu>`` = the CUDA device name with every run
of non-alphanumerics replaced by ``_``, e.g. ``NVIDIA_H200.json``), or the directory named by
``VLMPTQ_TRITON_CONFIG_DIR`` (searched first). Written by ``benchmarks/kernels.py --tune``::

    {"gpu": "NVIDIA H200", "triton": "3.6.0", "date": "...",
     "configs": {"w4g128:4608x3584": {"1": {"path": "dot", "block_n": 128, ...}, "16": {...}}}}

Keys: ``w<bits>g<effective group>:<N>x<K>`` (tried first) or ``w<bits>:<N>x<K>``; inside, the
M-bucket (the smallest listed M >= the call's M; a call above the largest listed M gets the default: a
file tuned for decode says nothing about prefill). 2/3/4-bit entries are
:class:`KernelConfig` s, 8-bit ones (``w8...``, the ``triton_w8`` kernel; per-channel: the group is K)
:class:`W8Config` s. Keys ``moe-w<bits>...`` are the fused mixture-of-experts launches (:mod:`.moe`; their M
bucket is the routed rows per expert, path "dot" only, ``programs`` ignored). Unknown fields are an error, so a
typo in a hand-edited file is reported instead of silently ignored.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from vllm_plugin.kernels.triton.layout import block_values, planes

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_DIR_ENV = "VLMPTQ_TRITON_CONFIG_DIR"
PATHS = ("dot", "dequant")  # the 8-bit kernel's
WNA16_PATHS = ("dot", "gemv", "dequant")  # the 2/3/4-bit kernels'
GEMV_MAX_M = 1  # the CUDA-core "gemv" path takes at most this many activation rows
HOPPER = 90  # compute capability x 10 the defaults are for when a caller does not say


def smem_budget(arch: int) -> int:
    """Bytes of pipelined buffers we allow one program (the card's per-block maximum minus room for
    Triton's own scratch): sm_90 227 KiB, sm_80 163 KiB, other sm_8x 99 KiB. A config that still
    does not fit falls back to a simpler one at its first launch (``ops.launch``)."""
    if arch >= 90:
        return 192 * 1024
    if arch == 80:
        return 144 * 1024
    return 88 * 1024


@dataclass(frozen=True)
class KernelConfig:
    """How one GEMM call is launched."""

    # "dot" (fused dequant + tensor cores, any M), "gemv" (fused dequant on the CUDA cores, M <= GEMV_MAX_M),
    # "dequant" (dequantize, then cuBLAS)
    path: str
    block_n: int = 32  # output channels per program
    block_m: int = 16  # activation rows per program ("dot" only; >= 16)
    # "dot": persistent programs (0: 2 per SM), sharing the work evenly; "gemv": about how many programs the
    # K split should make (0: 4 per SM)
    programs: int = 0
    num_warps: int = 4
    num_stages: int = 2  # software-pipelining depth of the block loop (1 = none)

    def __post_init__(self) -> None:
        _check_tiles(self, "config", ("block_n", "block_m", "num_warps"), WNA16_PATHS)
        if self.programs < 0 or self.num_stages < 1:
            raise ValueError("config programs must be >= 0 and num_stages >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> KernelConfig:
        return _from_dict(cls, d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class W8Config:
    """How one call of the 8-bit kernels is launched (:mod:`vllm_plugin.kernels.triton.w8`)."""

    path: str  # "dot" (fused dequant + tl.dot, K split), "dequant" (dequantize, then cuBLAS)
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128  # "dot": 64 or 128 (16+ columns per byte position); "dequant": see check()
    split_k: int = 1  # K splits, any count ("dot"; fp32 partial sums added in a fixed order)
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        _check_tiles(self, "W8 config", ("block_m", "block_n", "block_k", "num_warps"), PATHS)
        if self.path == "dot" and self.block_k not in (64, 128):
            raise ValueError(f"the fused W8 kernel steps 64 or 128 columns (16+ per byte dot), got {self.block_k}")
        if self.num_stages < 1 or self.split_k < 1:
            raise ValueError(f"W8 config num_stages and split_k must be >= 1, got {self.num_stages}, {self.split_k}")

    def check(self, group: int, k: int) -> None:
        """Raise ValueError if this launch cannot take a layer with this group (``k``: per-channel):
        the dequantize kernel needs one of group and K tile to divide the other (the fused one takes
        any group that is a multiple of 4)."""
        if self.path == "dequant" and group < k and group % self.block_k and self.block_k % group:
            raise ValueError(f"W8 dequantize launch with block_k {self.block_k} cannot take group {group}: one "
                             f"must divide the other (use dequant_block_k's choice, e.g. 32 for group 96)")

    @classmethod
    def from_dict(cls, d: dict) -> W8Config:
        return _from_dict(cls, d)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_tiles(cfg, what: str, pow2: tuple[str, ...], paths: tuple[str, ...]) -> None:
    """The checks both config classes share: a known path, power-of-two tiles and warps, and the
    tl.dot minimum tile on the "dot" path."""
    if cfg.path not in paths:
        raise ValueError(f"{what} path must be one of {paths}, got {cfg.path!r}")
    for name in pow2:
        v = getattr(cfg, name)
        if v < 1 or v & (v - 1):
            raise ValueError(f"{what} {name} must be a power of two >= 1, got {v}")
    if cfg.path == "dot" and (cfg.block_m < 16 or cfg.block_n < 16):
        raise ValueError(f"{what} path 'dot' needs block_m >= 16 and block_n >= 16 (tl.dot tile minimum)")


def _from_dict(cls, d: dict):
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


def config_class(key: str) -> type:
    """The config class of a tuned-file key: 8-bit shapes (``w8...``) launch the W8 kernels."""
    return W8Config if key.startswith("w8") else KernelConfig


def gpu_key(device_name: str) -> str:
    """File stem for a CUDA device name: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")


def shape_keys(bits: int, group: int, n: int, k: int, prefix: str = "") -> tuple[str, str]:
    return f"{prefix}w{bits}g{group}:{n}x{k}", f"{prefix}w{bits}:{n}x{k}"


def config_dirs() -> list[Path]:
    dirs = []
    if os.environ.get(CONFIG_DIR_ENV):
        dirs.append(Path(os.environ[CONFIG_DIR_ENV]))
    dirs.append(CONFIG_DIR)
    return dirs


@functools.lru_cache(maxsize=None)
def load_table(device_name: str) -> dict[str, dict[int, KernelConfig | W8Config]]:
    """Tuned configs for a GPU (merged over the config dirs, earlier dirs win); {} if none."""
    table: dict[str, dict[int, KernelConfig | W8Config]] = {}
    for d in reversed(config_dirs()):
        path = d / f"{gpu_key(device_name)}.json"
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
            for key, buckets in raw.get("configs", {}).items():
                table[key] = {int(m): config_class(key).from_dict(c) for m, c in buckets.items()}
                shape = re.fullmatch(r"w8g(\d+):\d+x(\d+)", key)
                for cfg in table[key].values() if shape else ():
                    cfg.check(int(shape[1]), int(shape[2]))  # a launch the key's layer cannot take
                if key.startswith("moe-") and any(c.path != "dot" for c in table[key].values()):
                    raise ValueError(f"{key}: the grouped MoE kernel has only the 'dot' path")
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"bad kernel config file {path}: {e}. Fix or delete it (defaults apply without it).") from e
        logger.info("vlmptq triton: loaded %d tuned shapes from %s", len(raw.get("configs", {})), path)
    return table


# default (block_n, num_warps, num_stages) by M tile and bits: the lowest sm_90 SASS instructions per
# weight among 2-3 stage pipelines that leave some registers spare (benchmarks/kernel_static.py
# --sweep, 2026-11-28; at 32/64 rows the 4-warp tiles sit at 246-255 registers, one spilled).
# More rows per thread (block_n / num_warps) = fewer instructions per weight and more registers; W3's
# 512-column blocks need the most shared memory (its 128-row M tile fits one stage only).
# Decode (16-row M tile; on sm_90 M = 2-16 since the gemv kernel took M = 1), measured on an H200
# (benchmarks/results/kernels-NVIDIA_H200-2026-11-29.json, sum of the 7B layer's 4 GEMMs at M = 1): W2 (128, 4, 3) 104 us, the best of 12; W3 (64, 4, 3) 120 us against
# 144 us for the (128, 8, 2) chosen from the SASS alone -- the best, (128, 4, 2) at 111 us (it is in the
# tuned H200 file), sits at 255 registers with Triton 3.6 and spills with 3.9; W4 (128, 4, 3) 112 us, the
# best (64, 4, 4) 110 us.
DEFAULT_TILES = {
    16: {2: (128, 4, 3), 3: (64, 4, 3), 4: (128, 4, 3)},
    32: {2: (128, 8, 3), 3: (128, 8, 2), 4: (128, 8, 3)},
    64: {2: (128, 8, 2), 3: (64, 4, 2), 4: (128, 8, 2)},
    # W4: (64, 4, 3) 331 us at M = 256 against 472 us for (128, 8, 2) (H200); W2 / W3 dequantize there instead
    128: {2: (128, 8, 2), 3: (128, 8, 1), 4: (64, 4, 3)},
}
# the same for sm_8x (mma.sync instead of wgmma; sm_80 compiles without spills, 144 KiB budget). The
# 128-row M tile: 128-row N tiles at W2 / W4 (9.4 / 15.2 instructions per weight on sm_80 against
# 16.8 / 17.5 for 64 x 8 warps, which Triton 3.6's ptxas also capped at 128 registers and spilled)
DEFAULT_TILES_SM8X = {
    16: {2: (128, 4, 2), 3: (64, 4, 3), 4: (128, 4, 2)},  # the sm_80 sweep's leanest (kernels-static-sm80-*)
    32: {2: (128, 8, 2), 3: (64, 4, 3), 4: (128, 8, 2)},
    64: {2: (128, 8, 2), 3: (64, 8, 2), 4: (64, 4, 2)},
    128: {2: (128, 8, 2), 3: (64, 8, 2), 4: (128, 8, 2)},
}
# sm_86 / sm_89 (A10, L4, RTX 30/40: 99 KiB of shared memory, 1536 threads per SM): ptxas caps this
# 8-warp tile at 128 registers there and spills it with two stages (compiled 2026-11-28); one stage does not
SM8X_SMALL_OVERRIDES = {(128, 2): (64, 8, 1)}


# sm_90, measured on an H200 (benchmarks/results/kernels-NVIDIA_H200-2026-11-29-gemv.md, sum of the 7B layer's
# 4 GEMMs): M = 1 on the CUDA-core kernel, (block_n, num_warps, num_stages) per bits -- 74.7 / 80.8 / 76.7 us at
# W2 / W3 / W4 against 104 / 113 / 111 us for the best MMA launches; above 128 rows W2 / W3 dequantize for cuBLAS
# (335 / 347 us at M = 256 against 439 / 474 us fused), W4 keeps the MMA loop with 64-row N tiles (331 vs 357 us)
GEMV_TILES = {2: (128, 4, 3), 3: (64, 4, 3), 4: (128, 4, 3)}
DEQUANT_ABOVE_128 = (2, 3)


def default_dot_config(bits: int, m: int, arch: int = HOPPER) -> KernelConfig:
    """The MMA ("dot") launch for ``m`` activation rows on a GPU of compute capability ``arch`` x 10 (tables
    from sm_90 / sm_80 compiles and the H200 timings; the persistent grid makes it independent of N and K)."""
    bm = 16 if m <= 16 else (32 if m <= 32 else (64 if m <= 64 else 128))
    bn, warps, stages = (DEFAULT_TILES if arch >= 90 else DEFAULT_TILES_SM8X)[bm][bits]
    if 80 < arch < 90:
        bn, warps, stages = SM8X_SMALL_OVERRIDES.get((bm, bits), (bn, warps, stages))
    return fit_smem(KernelConfig("dot", block_n=bn, block_m=bm, num_warps=warps, num_stages=stages), bits, arch)


def default_config(bits: int, m: int, arch: int = HOPPER) -> KernelConfig:
    """Launch for ``m`` activation rows with no tuned entry: on sm_90 the CUDA-core kernel at M = 1 and,
    for W2 / W3, dequantize + cuBLAS above 128 rows (timed, :data:`GEMV_TILES`); otherwise the MMA loop up to
    256 rows (sm_8x: untimed, from compiles) and dequantize + cuBLAS beyond."""
    if arch >= 90 and m <= GEMV_MAX_M:
        bn, warps, stages = GEMV_TILES[bits]
        return KernelConfig("gemv", block_n=bn, num_warps=warps, num_stages=stages)
    if m <= 256 and not (arch >= 90 and m > 128 and bits in DEQUANT_ABOVE_128):
        return default_dot_config(bits, m, arch)
    return KernelConfig("dequant", block_n=32, num_warps=4)


def smem_bytes(cfg: KernelConfig, bits: int) -> int:
    """Rough shared memory of the pipelined loop: per stage, one block's activation slices + weights,
    plus the dequantized chunk tile on its way to the MMA."""
    if cfg.path != "dot":
        return 0
    per_stage = block_values(bits) * cfg.block_m * 2 + planes(bits) * cfg.block_n * 16 * 4
    return cfg.num_stages * per_stage + cfg.block_n * 128 * 2


def fit_smem(cfg: KernelConfig, bits: int, arch: int = HOPPER) -> KernelConfig:
    """Shrink until the dot loop's buffers fit :func:`smem_budget`: stages down to 2, then block_m
    down to 64, then stages to 1, then block_m to 16 (keeping the loads pipelined matters more than a
    tall M tile)."""
    while smem_bytes(cfg, bits) > smem_budget(arch):
        if cfg.num_stages > 2:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_m > 64:
            cfg = replace(cfg, block_m=cfg.block_m // 2)
        elif cfg.num_stages > 1:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_m > 16:
            cfg = replace(cfg, block_m=cfg.block_m // 2)
        else:
            break
    return cfg


def tuned_config(device_name: str, bits: int, group: int, n: int, k: int, m: int, prefix: str = ""
                 ) -> KernelConfig | W8Config | None:
    """The tuned config for (GPU, bits, group, N, K, M-bucket), None if the files have none or ``m`` is above
    the shape's largest tuned M; ``prefix`` selects another launch family's keys (``moe-``: the grouped expert
    GEMMs, M = routed rows per expert)."""
    table = load_table(device_name)
    for key in shape_keys(bits, group, n, k, prefix):
        buckets = table.get(key)
        if buckets:
            bucket = next((b for b in sorted(buckets) if b >= m), None)
            return None if bucket is None else buckets[bucket]
    return None


def select_config(device_name: str, bits: int, group: int, n: int, k: int, m: int,
                  arch: int = HOPPER) -> KernelConfig:
    """Tuned config for (GPU, bits, group, N, K, M-bucket), else :func:`default_config` (also when a
    hand-edited file puts the "gemv" path on a bucket above :data:`GEMV_MAX_M` rows)."""
    tuned = tuned_config(device_name, bits, group, n, k, m)
    if tuned is None or (tuned.path == "gemv" and m > GEMV_MAX_M):
        return default_config(bits, m, arch)
    return tuned
