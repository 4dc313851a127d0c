#!/usr/bin/env python3
"""Kernel benchmark: vlmptq's Triton W2/W3/W4 GEMMs vs torch bf16 vs Humming, same run, same card.

Shapes: one Qwen2.5-VL-7B decoder layer (qkv 4608x3584 + bias, o 3584x3584, gate_up 37888x3584,
down 3584x18944), bf16 activations, M in {1, 16, 64, 256}, asymmetric group-128 weights at 2/3/4
bits, plus a quick symmetric / g32 / g64 check. Every implementation is checked against an fp32
dequantized reference (relative Frobenius error) and timed as a CUDA graph of back-to-back calls over
rotating weight copies (>= 3x L2), so weights stream from HBM as at decode. Achieved bandwidth is
reported against a measured device-to-device copy.

Humming (``humming-kernels==0.1.19``, what vLLM 0.33 runs for 2/3-bit) is prepared and called the
way vLLM does; that part is adapted from ``shared/tools/kernel_anchor/bench_anchor.py`` (our team's
speed anchor script), which remains the reference for how the anchor numbers were taken.

Modes:
  python benchmarks/kernels.py                    benchmark (GPU), writes kernels-<gpu>-<date>.{json,md}
  python benchmarks/kernels.py --tune             also search launch configs, write <out>/tuned/<gpu>.json
                                                  (--install copies it to vllm_plugin/kernels/configs/)
  python benchmarks/kernels.py --dry              CPU, Triton interpreter, tiny shapes: control flow only
"""

from __future__ import annotations

import os
import sys

DRY = "--dry" in sys.argv
if DRY:  # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))
import torch  # noqa: E402
from _results import git_commit  # noqa: E402

from vlmptq.checkpoint.packing import pack_columns, pack_rows  # noqa: E402
from vllm_plugin.kernels.triton.configs import (  # noqa: E402
    CONFIG_DIR, GEMV_MAX_M, KernelConfig, W8Config, default_config, default_dot_config, fit_smem, gpu_key,
)
from vllm_plugin.kernels.triton.layout import effective_group, repack  # noqa: E402

T0 = time.time()
# name -> (output partition sizes, K, has_bias); Qwen2.5-VL-7B LM: hidden 3584, intermediate 18944
LAYERS = {
    "qkv": ([28 * 128, 4 * 128, 4 * 128], 3584, True),
    "o": ([3584], 3584, False),
    "gate_up": ([18944, 18944], 3584, False),
    "down": ([3584], 18944, False),
}
DRY_LAYERS = {  # ragged N, K not a multiple of every block size
    "qkv": ([24, 8, 8], 384, True),
    "o": ([40], 384, False),
    "gate_up": ([40, 40], 256, False),
    "down": ([40], 640, False),
}
# the LM head (Qwen2.5-VL-7B: vocabulary 152064 x hidden 3584), timed at W8 (triton_w8) and W4 beside bf16
HEAD = (152064, 3584)
DRY_HEAD = (200, 256)
# speed-up goals over bf16 (sum of the 4 GEMMs): M -> bits -> factor; and over Humming at M=1
TARGETS = {1: {4: 3.0, 3: 3.8, 2: 5.0}, 16: {4: 2.8, 3: 3.4, 2: 4.2}, 64: {4: 1.8, 3: 1.8, 2: 1.8},
           256: {4: 0.95, 3: 0.95, 2: 0.95}}
HUMMING_GOAL = 1.3
REL_ERR_MAX = 2e-2
HUMMING_COMPUTE = json.dumps({"use_batch_invariant": False, "use_f16_accum": False, "gemm_type": "dense"})

RECORDS: list[dict] = []
META: dict = {"notes": []}
TUNED: dict = {}
_DUMP_LOCK = threading.Lock()


def elapsed() -> float:
    return time.time() - T0


def log(*a) -> None:
    print(f"[{elapsed():6.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------- device helpers
def sync() -> None:
    if torch.cuda.is_available() and not DRY:
        torch.cuda.synchronize()


def time_calls(calls, reps: int, use_graph: bool = True) -> tuple[float, str]:
    """Median microseconds per call of ``calls`` run back to back (captured in one CUDA graph)."""
    n = len(calls)
    if DRY:  # interpreter: one pass, wall clock (meaningless numbers, exercised control flow)
        t = time.perf_counter()
        calls[0]()
        return (time.perf_counter() - t) * 1e6, "dry"
    for f in calls[: min(n, 3)]:
        f()
    torch.cuda.synchronize()
    graph, mode = None, "graph"
    if use_graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for f in calls[: min(n, 3)]:
                    f()
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for f in calls:
                    f()
        except Exception as e:
            log(f"  graph capture failed ({type(e).__name__}: {str(e)[:200]}); timing eagerly")
            graph = None
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
    if graph is None:
        mode = "eager"

        def run():
            for f in calls:
                f()
    else:
        run = graph.replay
    run()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        st.record()
        run()
        en.record()
        en.synchronize()
        ts.append(st.elapsed_time(en) * 1000.0 / n)
    del graph
    return statistics.median(ts), mode


def measure_copy_bw(nbytes: int) -> float:
    """GB/s of a device-to-device copy, bytes read + written."""
    if DRY:
        return 1000.0
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(15):
        st.record()
        b.copy_(a)
        en.record()
        en.synchronize()
        ts.append(st.elapsed_time(en) / 1000.0)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(ts) / 1e9


# ----------------------------------------------------------------------------- weights
def make_checkpoint(n: int, k: int, bits: int, group: int, sym: bool, dtype, device, gen) -> dict:
    """Random compressed-tensors pack-quantized tensors plus the fp32 dequantized weight."""
    ng = k // group
    codes = torch.randint(0, 2**bits, (n, k), device=device, dtype=torch.int32, generator=gen)
    if sym:
        zeros = torch.full((n, ng), 2 ** (bits - 1), device=device, dtype=torch.int32)
    else:
        zeros = torch.randint(0, 2**bits, (n, ng), device=device, dtype=torch.int32, generator=gen)
    scale = ((torch.rand((n, ng), device=device, generator=gen) + 0.5) * (0.02 / 2 ** (bits - 1))).to(dtype)
    w_ref = (codes - zeros.repeat_interleave(group, 1)).float() * scale.float().repeat_interleave(group, 1)
    ct = {"weight_packed": pack_rows(codes, bits), "weight_scale": scale.contiguous(),
          "weight_zero_point": None if sym else pack_columns(zeros, bits)}
    del codes, zeros
    return {"ct": ct, "w_ref": w_ref}


def n_copies(nbytes: int, rot_bytes: int, max_copies: int) -> int:
    if DRY:
        return 1
    return int(min(max_copies, max(3, math.ceil(rot_bytes / max(nbytes, 1)))))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def record(**r) -> dict:
    RECORDS.append(r)
    return r


# ----------------------------------------------------------------------------- ours
class Ours:
    """One layer's prepared Triton tensors (with rotating copies) for one bit width."""

    def __init__(self, ct: dict, n: int, k: int, bits: int, dtype, nc_fn):
        from vllm_plugin.kernels.triton.ops import get_locks

        self.n, self.k, self.bits = n, k, bits
        qw, sz, self.group = repack(ct["weight_packed"], ct["weight_scale"], ct["weight_zero_point"], bits, k, dtype)
        self.locks = get_locks(qw.device)
        self.bytes = qw.nbytes + sz.nbytes
        self.copies = [(qw, sz)] + [(qw.clone(), sz.clone()) for _ in range(nc_fn(self.bytes) - 1)]

    def call(self, x, bias, i: int = 0, cfg: KernelConfig | None = None):
        qw, sz = self.copies[i % len(self.copies)]
        if cfg is None:
            return torch.ops.vlmptq.wna16_gemm(x, qw, sz, bias, self.locks, self.bits, self.n)
        from vllm_plugin.kernels.triton.ops import launch

        return launch(x, qw, sz, bias, self.locks, self.bits, self.n, cfg)

    def config_for(self, m: int) -> KernelConfig:
        from vllm_plugin.kernels.triton.ops import _config_for

        return _config_for(str(self.copies[0][0].device), self.bits, self.group, self.n, self.k, m)


class OursW8:
    """The same for the 8-bit kernel (vllm_plugin.kernels.triton_w8), duck-typed as :class:`Ours`."""

    def __init__(self, ct: dict, n: int, k: int, dtype, nc_fn):
        from vllm_plugin.kernels.triton_w8 import prepare_w8

        self.n, self.k, self.bits, self.group = n, k, 8, k // ct["weight_scale"].shape[1]
        t = prepare_w8(ct["weight_packed"], ct["weight_scale"], ct["weight_zero_point"], k, dtype)
        self.bytes = sum(v.nbytes for v in t.values())
        self.copies = [t] + [{kk: v.clone() for kk, v in t.items()} for _ in range(nc_fn(self.bytes) - 1)]

    def call(self, x, bias, i: int = 0, cfg=None):
        from vllm_plugin.kernels.triton_w8 import w8_launch

        t = self.copies[i % len(self.copies)]
        if cfg is None:
            return torch.ops.vlmptq.w8_gemm(x, t["qweight"], t["scale"], t["zero"], bias)
        return w8_launch(x, t["qweight"], t["scale"], t["zero"], bias, cfg)

    def config_for(self, m: int):
        from vllm_plugin.kernels.triton_w8 import _w8_config_for

        return _w8_config_for(str(self.copies[0]["qweight"].device), self.group, self.n, self.k, m, None, None)


def bench_bf16(x, copies, bias, args, tag: dict) -> dict:
    """Timing of ``torch.nn.functional.linear`` on rotating bf16 weight copies (the anchor)."""
    m, n = x.shape[0], copies[0].shape[0]
    rec = dict(impl="bf16", N=n, K=x.shape[1], M=m, bits=None, **tag)
    try:
        ncall = max(len(copies), args.min_calls)
        calls = [functools.partial(torch.nn.functional.linear, x, copies[i % len(copies)], bias) for i in range(ncall)]
        t, mode = time_calls(calls, args.reps, not args.no_graph)
        rec.update(t_us=t, rel_err=None, mode=mode, bytes=copies[0].nbytes + x.nbytes + m * n * 2)
    except Exception as e:
        rec.update(t_us=None, rel_err=None, error=repr(e))
    return record(**rec)


def bench_head(args, dev, dtype, gen, nc_fn) -> None:
    """The LM head at W8 (triton_w8) and W4 (the 2/3/4-bit kernel) beside bf16, asym g128, M in --ms."""
    n, k = DRY_HEAD if DRY else HEAD
    tag = dict(layer="lm_head", group_size=128, sym=False, main=False)
    w = (torch.randn(n, k, device=dev, generator=gen) * 0.02).to(dtype)
    copies = [w] + [w.clone() for _ in range(nc_fn(w.nbytes) - 1)]
    xs = {m: torch.randn(m, k, device=dev, generator=gen).to(dtype) for m in args.ms}
    for m in args.ms:
        r = bench_bf16(xs[m], copies, None, args, tag)
        log(f"lm_head M={m:3d} bf16    {_fmt(r.get('t_us'), '8.1f')} us")
    del copies, w
    w8 = None  # (prepared W8 head, references) kept for tuning
    for bits in (8, 4):
        if elapsed() > args.head_budget:
            META["notes"].append(f"lm_head: stopped for time before w{bits}")
            break
        ck = make_checkpoint(n, k, bits, 128, False, dtype, dev, gen)
        refs = {m: xs[m].float() @ ck["w_ref"].t() for m in args.ms}
        del ck["w_ref"]
        ours = OursW8(ck["ct"], n, k, dtype, nc_fn) if bits == 8 else Ours(ck["ct"], n, k, bits, dtype, nc_fn)
        del ck
        for m in args.ms:
            r = record(**bench_ours(ours, xs[m], None, refs[m], args, tag=tag))
            log(f"lm_head M={m:3d} w{bits} vlmptq  {_fmt(r.get('t_us'), '8.1f')} us  err {_fmt(r.get('rel_err'), '.1e')}")
        if bits == 8 and args.tune:
            w8 = (ours, refs)  # tuned after the W4 head is timed: the search must not crowd out a measurement
        del ours, refs
        if not DRY:
            torch.cuda.empty_cache()
    if w8 is not None and elapsed() < args.head_tune_budget:
        tune_w8(args, w8[0], xs, w8[1], tag)
        path = write_tuned(Path(args.out), META["gpu"], args.install)
        META["tuned_file"] = str(path) if path else META.get("tuned_file")


def bench_ours(ours: Ours, x, bias, ref, args, cfg=None, tag: dict | None = None) -> dict:
    """Correctness (output poisoned with NaN first) + timing of one (layer, bits, M[, config])."""
    m = x.shape[0]
    cfg_used = cfg or ours.config_for(m)
    rec = dict(impl="vlmptq", N=ours.n, K=ours.k, M=m, bits=ours.bits, path=cfg_used.path,
               config=cfg_used.to_dict(), **(tag or {}))
    try:
        if not DRY:  # free a NaN-filled block of the output's size first: unwritten outputs show as NaN
            poison = torch.full((m, ours.n), float("nan"), dtype=x.dtype, device=x.device)
            del poison
        y = ours.call(x, bias, 0, cfg)
        sync()
        rec["finite"] = bool(torch.isfinite(y).all())
        rec["rel_err"] = rel_err(y, ref)
        del y
        ncall = max(len(ours.copies), args.min_calls)
        calls = [functools.partial(ours.call, x, bias, i, cfg) for i in range(ncall)]
        t, mode = time_calls(calls, args.reps, not args.no_graph)
        io = x.nbytes + m * ours.n * x.element_size()
        rec.update(t_us=t, mode=mode, bytes=ours.bytes + io, n_copies=len(ours.copies))
    except Exception as e:
        rec.update(t_us=None, rel_err=rec.get("rel_err"), error=f"{type(e).__name__}: {str(e)[:400]}")
        log(f"  OURS FAILED {rec.get('layer')} w{ours.bits} M={m}: {rec['error']}")
        if args.verbose:
            traceback.print_exc()
        with contextlib.suppress(Exception):
            sync()
    return rec


# ----------------------------------------------------------------------------- humming (adapted from bench_anchor.py)
class Humming:
    """Humming driven as vLLM 0.33's HummingLinearKernel drives it (compressed-tensors WNA16 path)."""

    def __init__(self):
        import humming  # noqa: F401
        from humming.forward import humming_forward
        from humming.kernel.humming import HummingKernel
        from humming.ops.utils import init_humming_launcher

        self.version = humming.__version__
        self._setup_cuda_env()
        init_humming_launcher()
        self.forward, self.Kernel = humming_forward, HummingKernel
        self.locks = torch.zeros(torch.cuda.get_device_properties(0).multi_processor_count * 8,
                                 dtype=torch.int32, device="cuda")

    @staticmethod
    def _setup_cuda_env():
        """NVRTC needs libnvrtc-builtins on LD_LIBRARY_PATH and CCCL/crt headers (carried wheels)."""
        from humming.utils import cuda as hcuda
        from humming.utils import nvrtc as hnvrtc

        with contextlib.suppress(Exception):
            lib_dir, _p, _e = hnvrtc._find_nvrtc_lib_dir()
            cur = os.environ.get("LD_LIBRARY_PATH", "")
            if lib_dir and lib_dir not in cur.split(":"):
                os.environ["LD_LIBRARY_PATH"] = lib_dir + (":" + cur if cur else "")
        hdrs = ["cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h", "crt/host_defines.h", "cuda/std/cstdint",
                "cuda/std/type_traits"]

        def has(paths, h):
            return any(os.path.exists(os.path.join(p, h)) for p in paths)

        try:
            from humming.jit.compiler import NVRTCCompiler

            envs = hcuda.find_all_cuda_paths()
            inc = list(hcuda.filter_cuda_paths(required_headers=["cuda_runtime.h"])["include_paths"])
            if any(not has(inc, h) for h in hdrs):
                major = int(str(torch.version.cuda).split(".")[0])
                union = []
                for e in sorted(envs, key=lambda e: -sum(has(e["include_paths"], h) for h in hdrs)):
                    if e["major"] == major:
                        union += [p for p in e["include_paths"] if p not in union]
                NVRTCCompiler._get_include_dirs = classmethod(lambda cls: list(cls.include_dirs()) + union)
                META["notes"].append(f"humming NVRTC include dirs patched: {union}")
        except Exception as e:
            log(f"  humming include check failed: {e!r}")

    def prepare(self, ct: dict, stacks: list[int], k: int, bits: int, bias, group: int) -> tuple:
        """Mirror of vLLM 0.33 HummingLinearKernel.process_weights_after_loading."""
        from humming.schema import BaseWeightSchema, HummingInputSchema
        from humming.transform import prepare_and_transform_humming_tensors

        n = sum(stacks)
        source = {"weight": ct["weight_packed"], "weight_scale": ct["weight_scale"],
                  "zero_point": ct["weight_zero_point"],
                  "weight_shape": torch.tensor([n, k], dtype=torch.int64, device="cuda")}
        if bias is not None:
            source["bias"] = bias
        ws = BaseWeightSchema.from_config({"quant_method": "humming", "dtype": f"int{bits}", "group_size": group,
                                           "has_zero_point": True})
        ins = HummingInputSchema()
        ws, tensors = ws.convert_humming(tensors=source, shape_n_stacks=list(stacks), shape_k_stacks=[k],
                                         param_dtype=torch.bfloat16)
        ins, in_t = ins.convert_humming(tensors=source, shape_n_stacks=list(stacks), shape_k_stacks=[k],
                                        param_dtype=torch.bfloat16)
        tensors.update(in_t)
        for name in ("input_scale", "input_scale_2"):
            tensors.pop(name, None)
        config, out = prepare_and_transform_humming_tensors(
            tensors=tensors, shape_n=n, shape_k=k, weight_schema=ws,
            input_schema=ins.to_humming_schema(torch.bfloat16), pad_n_to_multiple=256, pad_k_to_multiple=128,
            has_bias=bias is not None, torch_dtype=torch.bfloat16, device=tensors["weight"].device)
        return config, out

    def tuning_for(self, config, m: int) -> str:
        """vLLM's default heuristic kernel for this M, as a one-interval tuning config."""
        _l, _c, confs = self.Kernel._resolve_configs(config.to_str(), HUMMING_COMPUTE, None, 0)
        if isinstance(confs, dict):
            return json.dumps([[0, 1 << 30, confs]], default=_json_scalar)
        for lo, hi, cfg in confs:
            if lo < m <= (hi if hi > 0 else 1 << 30):
                return json.dumps([[0, hi, cfg]], default=_json_scalar)
        raise RuntimeError(f"no humming heuristic interval for m={m}")

    def precompile(self, items) -> None:
        """items: (config, tuning_json); compiles in parallel (NVRTC)."""
        specs = []
        for config, tj in items:
            _l, _c, tun = self.Kernel._resolve_configs(config.to_str(), HUMMING_COMPUTE, tj, 0)
            for _lo, _hi, t in tun:
                kc = _l | _c | t
                kc.pop("num_sms", 0)
                specs.append((self.Kernel, kc))
        if specs:
            t = time.time()
            self.Kernel.compile_many(specs, 0)
            log(f"humming: precompiled {len(specs)} kernels in {time.time() - t:.1f}s")

    def call(self, config, tensors, x, tj):
        return self.forward(config, inputs=x, weight=tensors["weight"], weight_scale=tensors.get("weight_scale"),
                            zero_point=tensors.get("zero_point"), bias=tensors.get("bias"),
                            weight_scale_2=tensors.get("weight_scale_2"), input_scale=None, input_scale_2=None,
                            hadamard_block_size=0, locks=self.locks, compute_config=HUMMING_COMPUTE,
                            tuning_config=tj)


def _json_scalar(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


# ----------------------------------------------------------------------------- prewarm (parallel compiles)
def _prewarm_one(spec: dict) -> str:
    """Child process: compile one Triton launch by running it once on random tensors of that shape."""
    try:
        from vllm_plugin.kernels.triton.layout import kernel_shapes
        from vllm_plugin.kernels.triton.ops import get_locks, launch

        bits, n, k, m, group = spec["bits"], spec["n"], spec["k"], spec["m"], spec["group"]
        dtype = getattr(torch, spec["dtype"])
        if bits == 8:
            from vllm_plugin.kernels.triton_w8 import w8_launch

            qw = torch.randint(-2**31, 2**31 - 1, (n, k // 4), dtype=torch.int32, device="cuda")
            s = torch.full((n, k // group), 0.01, dtype=dtype, device="cuda")
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            w8_launch(x, qw, s, torch.full_like(s, 128.0), None, W8Config.from_dict(spec["cfg"]))
            torch.cuda.synchronize()
            return "ok"
        q_shape, sz_shape = kernel_shapes(bits, n, k, group)
        qw = torch.randint(-2**31, 2**31 - 1, q_shape, dtype=torch.int32, device="cuda")
        sz = torch.full(sz_shape, 0x3C003C00, dtype=torch.int32, device="cuda")
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        bias = torch.randn(n, dtype=dtype, device="cuda") if spec["bias"] else None
        launch(x, qw, sz, bias, get_locks(x.device), bits, n, KernelConfig.from_dict(spec["cfg"]))
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:300]}"


def prewarm(specs: list[dict], procs: int) -> None:
    """Compile many launch variants in parallel processes (Triton's on-disk cache is shared)."""
    if DRY or procs <= 1 or not specs:
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    uniq = {json.dumps(s, sort_keys=True): s for s in specs}
    t = time.time()
    try:
        with cf.ProcessPoolExecutor(max_workers=min(procs, len(uniq)), mp_context=mp.get_context("spawn")) as ex:
            res = list(ex.map(_prewarm_one, uniq.values()))
        bad = [r for r in res if r != "ok"]
        log(f"prewarm: {len(uniq)} launch variants compiled in {time.time() - t:.1f}s ({procs} procs), "
            f"{len(bad)} failed" + (f": {bad[:3]}" if bad else ""))
    except Exception as e:
        log(f"prewarm failed ({type(e).__name__}: {e}); kernels compile on first use")


def spec_for(bits, group, n, k, m, dtype, cfg: KernelConfig | W8Config, bias: bool) -> dict:
    return dict(bits=bits, group=group, n=n, k=k, m=m, dtype=str(dtype).split(".")[-1], cfg=cfg.to_dict(), bias=bias)


# ----------------------------------------------------------------------------- tuning
# "gemv" launch shapes (block_n, num_warps, num_stages) per bits: no spills with Triton 3.6 / 3.9 on sm_90
GEMV_SHAPES = {4: ((256, 4, 3), (128, 4, 3), (256, 8, 3), (128, 4, 4)),
               2: ((128, 4, 3), (256, 8, 3), (64, 4, 3), (128, 4, 4)),
               3: ((128, 8, 3), (64, 8, 3), (64, 4, 3))}


def candidates(bits: int, m: int, sms: int, arch: int, dry: bool) -> list[KernelConfig]:
    """A small, ordered search space per M on a GPU with ``sms`` SMs of compute capability ``arch``
    x 10 (the default first)."""
    base = default_config(bits, m, arch)
    dot = default_dot_config(bits, m, arch)  # the MMA launch the variants below start from
    out = [base]
    if dry:
        gemv = [KernelConfig("gemv", block_n=16, programs=3)] if m <= GEMV_MAX_M else []
        return list(dict.fromkeys([base, replace(dot, programs=3)] + gemv))
    if m <= 64:  # a diverse dozen around the default (the list is cut at --max-candidates)
        def near(**kw):
            return fit_smem(replace(dot, **kw), bits, arch)

        # more rows per thread (block_n / num_warps) = fewer instructions per weight (kernel_static.py)
        # and more registers; deeper pipelines hide more memory latency
        for bn, warps, stages in ((128, 4, 2), (128, 4, 4), (256, 8, 2), (256, 8, 3), (64, 4, 2), (64, 4, 3),
                                  (128, 8, 2), (128, 8, 3), (64, 4, 4)):
            out.append(near(block_n=bn, num_warps=warps, num_stages=stages))
        # persistent programs: 1 / 3 per SM besides the default 2 (occupancy vs. tile sharing)
        out += [dot, replace(dot, programs=sms), replace(dot, programs=3 * sms)]
        if m <= GEMV_MAX_M:  # the CUDA-core path (kernels._gemv_kernel): shapes that compile without spills
            out += [KernelConfig("gemv", block_n=bn, num_warps=w, num_stages=s) for bn, w, s in GEMV_SHAPES[bits]]
    else:
        for bm, bn, warps in ((64, 128, 4), (128, 128, 8), (128, 64, 4), (64, 256, 8), (128, 256, 8)):
            for stages in (2, 3):
                out.append(fit_smem(replace(dot, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages),
                                    bits, arch))
        out.append(KernelConfig("dequant", block_n=32))
    return list(dict.fromkeys(out))


def w8_candidates(m: int, n: int, k: int, group: int, sms: int, arch: int, dry: bool) -> list[W8Config]:
    """The 8-bit kernel's search space per M (the heuristic first): N / K tile and warps around it (more
    weights per thread = fewer instructions per weight, more registers), and from 32 rows on the other
    path (fused vs dequantize + cuBLAS)."""
    from vllm_plugin.kernels.triton.w8 import dequant_block_k, k_splits, w8_block_m, w8_config

    base = w8_config(m, n, k, group, sms, arch)
    if dry:
        return list(dict.fromkeys([base, replace(base, split_k=2) if base.path == "dot" else base]))
    bm = w8_block_m(m)
    shapes = {16: ((128, 128, 4, 3), (64, 128, 4, 3), (256, 64, 4, 3), (128, 128, 8, 3), (256, 128, 8, 3),
                   (128, 128, 4, 2), (128, 128, 4, 4), (128, 64, 4, 3)),
              32: ((64, 128, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3), (256, 128, 8, 3)),
              64: ((64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 2))}[bm]
    out = [base]
    for bn, bk, warps, stages in shapes:
        out.append(W8Config("dot", block_m=bm, block_n=bn, block_k=bk, split_k=k_splits(m, n, k, bm, bn, bk, sms),
                            num_warps=warps, num_stages=stages))
    if m >= 32:
        out.append(W8Config("dequant", block_n=32, block_k=dequant_block_k(group, k), num_stages=1))
    return list(dict.fromkeys(out))


def tune_w8(args, ours, xs: dict, refs: dict, tag: dict) -> None:
    """Search the 8-bit kernel's launch per M in --tune-ms (compiled in parallel first), keep the
    fastest correct one under ``w8g<group>:<N>x<K>``."""
    ms = [m for m in args.ms if m in args.tune_ms]
    plan = [(m, w8_candidates(m, ours.n, ours.k, ours.group, META["sms"], META["arch"], DRY)[: args.max_candidates])
            for m in ms]
    prewarm([spec_for(8, ours.group, ours.n, ours.k, m, xs[m].dtype, c, False) for m, cands in plan for c in cands],
            args.procs)
    for m, cands in plan:
        best = None
        for c in cands:
            if elapsed() > args.head_tune_budget:
                META["notes"].append(f"lm_head w8 tune: stopped for time at M={m}")
                return
            r = record(**bench_ours(ours, xs[m], None, refs[m], args, cfg=c, tag=dict(tag, tune=True)))
            ok = r.get("t_us") is not None and r.get("finite") and (r.get("rel_err") or 1) < REL_ERR_MAX
            if ok and (best is None or r["t_us"] < best[0]):
                best = (r["t_us"], c)
        if best is not None:
            TUNE_BEST[("lm_head", 8, m)] = best[0]
            TUNED.setdefault(f"w8g{ours.group}:{ours.n}x{ours.k}", {})[str(m)] = best[1].to_dict()
            log(f"tuned lm_head w8 M={m}: {best[0]:.1f} us with {best[1].to_dict()}")


def write_tuned(out_dir: Path, gpu: str, install: bool, tuned: dict | None = None) -> Path | None:
    """Merge ``tuned`` (``{key: {M bucket: config dict}}``; default this run's ``TUNED``) into
    ``<out_dir>/tuned/<gpu>.json``, and with ``install`` into the plugin's config dir's file for the GPU too
    (entries of other launch families there, e.g. the dense kernels' when the MoE tuner installs, are kept)."""
    tuned = TUNED if tuned is None else tuned
    if not tuned:
        return None
    import triton

    def merge_into(path: Path) -> int:
        old = {}
        if path.is_file():
            with contextlib.suppress(Exception):
                old = json.loads(path.read_text()).get("configs", {})
        for key, buckets in tuned.items():
            old.setdefault(key, {}).update(buckets)
        payload = {"gpu": gpu, "triton": triton.__version__, "torch": torch.__version__,
                   "date": datetime.date.today().isoformat(), "configs": old}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1, sort_keys=True))
        return len(old)

    path = out_dir / "tuned" / f"{gpu_key(gpu)}.json"
    log(f"tuned configs for {merge_into(path)} shapes -> {path}")
    if install:
        log(f"installed -> {CONFIG_DIR / path.name} ({merge_into(CONFIG_DIR / path.name)} shapes)")
    return path


# ----------------------------------------------------------------------------- reporting
def _fmt(v, f: str) -> str:
    if v is None:
        return "-"
    return format(v, f)


def decoder_sums(layers: list[str]) -> list[dict]:
    """Per (M, bits): sum over the 4 GEMMs of bf16 / humming / vlmptq (g128 asym main records)."""
    def get(layer, m, impl, bits=None):
        for r in RECORDS:
            if (r["layer"] == layer and r["M"] == m and r["impl"] == impl and r.get("bits") == bits
                    and r.get("t_us") is not None and r.get("main")):
                return r
        return None

    out = []
    ms = sorted({r["M"] for r in RECORDS if r.get("main")})
    bits_list = sorted({r["bits"] for r in RECORDS if r.get("main") and r["bits"]})
    for m in ms:
        base = [get(lay, m, "bf16") for lay in layers]
        tb = sum(r["t_us"] for r in base) if all(base) else None
        for b in bits_list:
            row = {"M": m, "bits": b, "bf16_us": tb}
            for impl in ("humming", "vlmptq"):
                rs = [get(lay, m, impl, b) for lay in layers]
                if all(rs):
                    t = sum(r["t_us"] for r in rs)
                    by = sum(r.get("bytes") or 0 for r in rs)
                    row[f"{impl}_us"] = t
                    row[f"{impl}_x"] = tb / t if tb else None
                    row[f"{impl}_bw"] = by / t / 1e3 / META["copy_bw_gbs"] if META.get("copy_bw_gbs") else None
                    row[f"{impl}_err"] = max(r.get("rel_err") or 0 for r in rs)
            tuned = [TUNE_BEST.get((lay, b, m)) for lay in layers]
            if all(tuned):
                row["tuned_us"] = sum(tuned)
                row["tuned_x"] = tb / row["tuned_us"] if tb else None
            goal = TARGETS.get(m, {}).get(b)
            row["goal_x"] = goal
            best = min([v for v in (row.get("vlmptq_us"), row.get("tuned_us")) if v] or [None], key=lambda v: v or 0)
            row["best_us"] = best
            row["meets_bf16_goal"] = (tb / best >= goal) if (goal and best and tb) else None
            if m == 1 and b in (2, 3) and row.get("humming_us") and best:
                row["vs_humming"] = row["humming_us"] / best
                row["meets_humming_goal"] = row["vs_humming"] >= HUMMING_GOAL
            out.append(row)
    return out


TUNE_BEST: dict = {}  # (layer, bits, M) -> best t_us found by --tune


def summary_lines(sums: list[dict]) -> list[str]:
    lines = ["| M | bits | bf16 us | humming us (x bf16) | vlmptq us (x bf16, bw) | tuned us (x bf16) | "
             "goal x bf16 | vs humming | max rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sums:
        goal = r.get("goal_x")
        ok = {True: "PASS", False: "MISS", None: ""}[r.get("meets_bf16_goal")]
        vh = r.get("vs_humming")
        lines.append(
            f"| {r['M']} | w{r['bits']} | {_fmt(r.get('bf16_us'), '.1f')} | "
            f"{_fmt(r.get('humming_us'), '.1f')} ({_fmt(r.get('humming_x'), '.2f')}x) | "
            f"{_fmt(r.get('vlmptq_us'), '.1f')} ({_fmt(r.get('vlmptq_x'), '.2f')}x, {_fmt(r.get('vlmptq_bw'), '.2f')}) | "
            f"{_fmt(r.get('tuned_us'), '.1f')} ({_fmt(r.get('tuned_x'), '.2f')}x) | "
            f"{_fmt(goal, '.2f')} {ok} | {_fmt(vh, '.2f')}{'' if vh is None else (' PASS' if vh >= HUMMING_GOAL else ' MISS')} | "
            f"{_fmt(r.get('vlmptq_err'), '.1e')} |")
    return lines


def layer_lines() -> list[str]:
    lines = ["| layer | N x K | M | impl | bits | g | sym | path | t us | bw frac | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in RECORDS:
        if r.get("tune"):
            continue
        bw = (r["bytes"] / r["t_us"] / 1e3 / META["copy_bw_gbs"]) if (r.get("t_us") and r.get("bytes")
                                                                       and META.get("copy_bw_gbs")) else None
        lines.append(f"| {r['layer']} | {r['N']}x{r['K']} | {r['M']} | {r['impl']} | {r.get('bits') or '-'} | "
                     f"{r.get('group_size') or '-'} | {r.get('sym', '-')} | {r.get('path', '-')} | "
                     f"{_fmt(r.get('t_us'), '.1f')} | {_fmt(bw, '.2f')} | {_fmt(r.get('rel_err'), '.1e')}"
                     f"{' ERROR ' + r['error'][:80] if r.get('error') else ''} |")
    return lines


def head_lines() -> list[str]:
    """The LM head per M: bf16, W8 with the plugin's launch, the best --tune found, W4 (x bf16)."""
    heads = [r for r in RECORDS if r.get("layer") == "lm_head" and not r.get("tune")]
    if not heads:
        return []

    def t(m, impl, bits=None):
        return next((r.get("t_us") for r in heads if r["M"] == m and r["impl"] == impl and r.get("bits") == bits), None)

    lines = ["| M | bf16 us | W8 us (x bf16) | W8 tuned us (x bf16) | W4 us (x bf16) |", "|---|---|---|---|---|"]
    for m in sorted({r["M"] for r in heads}):
        b = t(m, "bf16")
        cells = [t(m, "vlmptq", 8), TUNE_BEST.get(("lm_head", 8, m)), t(m, "vlmptq", 4)]
        lines.append(f"| {m} | {_fmt(b, '.1f')} | " + " | ".join(
            f"{_fmt(v, '.1f')} ({_fmt(b / v if b and v else None, '.2f')}x)" for v in cells) + " |")
    return lines


def dump(args, final: bool) -> None:
    with _DUMP_LOCK:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        gpu = META.get("gpu", "unknown")
        stem = f"kernels-{gpu_key(gpu)}-{datetime.date.today().isoformat()}"
        sums = decoder_sums(args.layers)
        payload = {"gpu": gpu, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "commit": META.get("commit"), "command": " ".join([sys.executable] + sys.argv),
                   "copy_bw_gbs": META.get("copy_bw_gbs"), "records": RECORDS, "decoder_layer_sums": sums,
                   "meta": META, "complete": final, "elapsed_s": round(elapsed(), 1)}
        (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str))
        if not final:
            return
        md = [f"# Kernel benchmark {gpu} {payload['date']}", "",
              f"commit {payload['commit']}, copy bandwidth {_fmt(META.get('copy_bw_gbs'), '.0f')} GB/s, "
              f"torch {META.get('torch')}, triton {META.get('triton')}, humming {META.get('humming')}", "",
              "Sum of the 4 GEMMs of a Qwen2.5-VL-7B decoder layer (asym g128, bf16 activations, CUDA graphs, "
              "weights from HBM). bw = bytes moved / time / copy bandwidth.", ""]
        md += summary_lines(sums)
        if head_lines():
            md += ["", f"## LM head {HEAD[0]}x{HEAD[1]} (asym g128; W8: triton_w8, W4: the 2/3/4-bit kernel)", ""]
            md += head_lines()
        md += ["", "## Per layer", ""] + layer_lines()
        (out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
        print("\n" + "=" * 110)
        print(f"VLMPTQ KERNEL SUMMARY  gpu={gpu}  copyBW={_fmt(META.get('copy_bw_gbs'), '.0f')} GB/s  "
              f"elapsed={elapsed():.0f}s  files: {out_dir / stem}.{{json,md}}")
        for line in summary_lines(sums) + ([""] if head_lines() else []) + head_lines():
            print(line)
        errs = [r for r in RECORDS if r.get("error")]
        bad = [r for r in RECORDS if (r.get("rel_err") or 0) > REL_ERR_MAX or r.get("finite") is False]
        print(f"records {len(RECORDS)}, errors {len(errs)}, rel_err>{REL_ERR_MAX} or non-finite {len(bad)}")
        for r in (errs + bad)[:12]:
            print(f"  {r['impl']} {r['layer']} w{r.get('bits')} g{r.get('group_size')} M={r['M']}: "
                  f"{r.get('error') or ('rel_err %.2e finite %s' % (r.get('rel_err') or -1, r.get('finite')))}")
        for n in META["notes"]:
            print("note:", n)
        print("=" * 110, flush=True)


# ----------------------------------------------------------------------------- main flow
def run(args) -> None:
    dev = torch.device("cpu" if DRY else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    import triton

    META.update(torch=torch.__version__, triton=triton.__version__, commit=git_commit(),
                kernels_sha=hashlib.sha256((REPO / "vllm_plugin/kernels/triton/kernels.py").read_bytes()).hexdigest()[:12])
    if DRY:
        META.update(gpu="DRY-interpreter", sms=132, arch=90, l2=8 << 20)
    else:
        props = torch.cuda.get_device_properties(0)
        META.update(gpu=props.name, sms=props.multi_processor_count, l2=int(getattr(props, "L2_cache_size", 50 << 20)),
                    cc=f"{props.major}.{props.minor}", arch=10 * props.major + props.minor)
    log(f"{META['gpu']}: torch {META['torch']} triton {META['triton']} commit {META['commit']}")
    META["copy_bw_gbs"] = measure_copy_bw(1 << 30)
    log(f"copy bandwidth (read+write) {META['copy_bw_gbs']:.0f} GB/s")

    hm = None
    if not DRY and not args.no_humming:
        try:
            hm = Humming()
            META["humming"] = hm.version
        except Exception as e:
            META["notes"].append(f"humming unavailable: {type(e).__name__}: {str(e)[:200]}")
            log(f"humming unavailable ({type(e).__name__}: {e}); timing bf16 and vlmptq only")

    layers = DRY_LAYERS if DRY else LAYERS
    dtype = torch.float16 if DRY else torch.bfloat16  # the interpreter's tl.dot mishandles bf16
    rot = int(args.l2_mult * META["l2"])
    nc_fn = functools.partial(n_copies, rot_bytes=rot, max_copies=args.max_copies)
    gen = torch.Generator(device=dev).manual_seed(1234)
    xs = {name: {m: torch.randn(m, layers[name][1], device=dev, generator=gen).to(dtype) for m in args.ms}
          for name in args.layers}

    # ---- build: checkpoints, ours, humming, bf16 copies, fp32 references
    built = {}  # (name, bits) -> dict
    bf16 = {}
    for name in args.layers:
        stacks, k, has_bias = layers[name]
        n = sum(stacks)
        bias = (torch.randn(n, device=dev, generator=gen) * 0.1).to(dtype) if has_bias else None
        w = (torch.randn(n, k, device=dev, generator=gen) * 0.02).to(dtype)
        bf16[name] = {"copies": [w] + [w.clone() for _ in range(nc_fn(w.nbytes) - 1)], "bias": bias}
        for bits in args.bits:
            if elapsed() > args.budget * 0.4:
                META["notes"].append(f"build stopped for time at {name} w{bits}")
                break
            t = time.time()
            ck = make_checkpoint(n, k, bits, 128, False, dtype, dev, gen)
            refs = {m: xs[name][m].float() @ ck["w_ref"].t() + (bias.float() if bias is not None else 0.0)
                    for m in args.ms}
            del ck["w_ref"]
            entry = {"refs": refs, "bias": bias, "ours": Ours(ck["ct"], n, k, bits, dtype, nc_fn)}
            if hm is not None:
                try:
                    cfg, tens = hm.prepare(ck["ct"], stacks, k, bits, bias, 128)
                    per = sum(v.nbytes for v in tens.values())
                    copies = [tens] + [{kk: v.clone() for kk, v in tens.items()} for _ in range(nc_fn(per) - 1)]
                    entry["hm"] = {"config": cfg, "copies": copies, "bytes": per,
                                   "tj": {m: hm.tuning_for(cfg, m) for m in args.ms}}
                except Exception as e:
                    log(f"  humming build failed {name} w{bits}: {type(e).__name__}: {str(e)[:300]}")
                    for m in args.ms:
                        record(layer=name, N=n, K=k, M=m, impl="humming", bits=bits, group_size=128, sym=False,
                               t_us=None, rel_err=None, main=True, error=f"build: {type(e).__name__}: {e}")
            built[(name, bits)] = entry
            del ck
            log(f"built {name} w{bits} N={n} K={k} ours {entry['ours'].bytes / 2**20:.1f} MiB "
                f"x{len(entry['ours'].copies)} ({time.time() - t:.1f}s)")
        if not DRY:
            torch.cuda.empty_cache()

    # ---- compile in parallel: our launch variants (every M) and humming's heuristic kernels
    specs = []
    for (name, bits), e in built.items():
        o = e["ours"]
        for m in args.ms:
            specs.append(spec_for(bits, o.group, o.n, o.k, m, dtype, o.config_for(m), e["bias"] is not None))
    for name in [lay for lay in ("o", "qkv") if lay in args.layers]:  # the quick checks' variants
        stacks, k, has_bias = layers[name]
        for bits in args.bits:
            for group in (64, 32):
                ge = effective_group(group, k)
                for m in [mm for mm in args.ms if mm in (1, 16)]:
                    cfg = default_config(bits, m, META["arch"])
                    specs.append(spec_for(bits, ge, sum(stacks), k, m, dtype, cfg, has_bias))
    prewarm(specs, args.procs)
    if hm is not None:
        with contextlib.suppress(Exception):
            hm.precompile([(e["hm"]["config"], tj) for e in built.values() if "hm" in e for tj in e["hm"]["tj"].values()])

    # ---- main benchmark, M = 1 first
    for m in args.ms:
        for name in args.layers:
            if elapsed() > args.budget:
                META["notes"].append(f"budget: stopped before {name} M={m}")
                break
            stacks, k, has_bias = layers[name]
            n = sum(stacks)
            x = xs[name][m]
            tag = dict(layer=name, group_size=128, sym=False, main=True)
            bench_bf16(x, bf16[name]["copies"], bf16[name]["bias"], args, tag)
            for bits in args.bits:
                e = built.get((name, bits))
                if e is None:
                    continue
                r = record(**bench_ours(e["ours"], x, e["bias"], e["refs"][m], args, tag=tag))
                log(f"{name:7s} M={m:3d} w{bits} vlmptq  {_fmt(r.get('t_us'), '8.1f')} us  err {_fmt(r.get('rel_err'), '.1e')}"
                    f"  [{r.get('path')} {r.get('mode')}]")
                if "hm" in e:
                    h = e["hm"]
                    rec = dict(impl="humming", N=n, K=k, M=m, bits=bits, **tag)
                    try:
                        y = hm.call(h["config"], h["copies"][0], x, h["tj"][m])
                        sync()
                        rec.update(rel_err=rel_err(y, e["refs"][m]), finite=bool(torch.isfinite(y).all()))
                        del y
                        cps = h["copies"]
                        calls = [functools.partial(hm.call, h["config"], cps[i % len(cps)], x, h["tj"][m])
                                 for i in range(max(len(cps), args.min_calls))]
                        t, mode = time_calls(calls, args.reps, not args.no_graph)
                        rec.update(t_us=t, mode=mode, bytes=h["bytes"] + x.nbytes + m * n * 2)
                    except Exception as ex:
                        rec.update(t_us=None, rel_err=rec.get("rel_err"), error=f"{type(ex).__name__}: {str(ex)[:300]}")
                    record(**rec)
                    log(f"{name:7s} M={m:3d} w{bits} humming {_fmt(rec.get('t_us'), '8.1f')} us  err {_fmt(rec.get('rel_err'), '.1e')}")
        dump(args, final=False)

    # ---- tuning (before the quick checks: tests/gpu already covers their correctness)
    if args.tune:
        tune(args, built, xs, dtype)

    # ---- quick checks: symmetric, g32, g64 (ours only)
    quick_layers = [lay for lay in ("o", "qkv") if lay in args.layers][:1 if DRY else 2]
    for name in quick_layers:
        stacks, k, has_bias = layers[name]
        n = sum(stacks)
        for bits in args.bits[:1] if DRY else args.bits:
            for group, sym in ((128, True), (64, False), (32, False)):
                if elapsed() > args.quick_budget:
                    break
                ck = make_checkpoint(n, k, bits, group, sym, dtype, dev, gen)
                bias = built.get((name, bits), {}).get("bias")
                o = Ours(ck["ct"], n, k, bits, dtype, lambda b: 1 if DRY else 4)
                for m in [mm for mm in args.ms if mm in (1, 16, 3)] or args.ms[:1]:
                    x = xs[name][m]
                    ref = x.float() @ ck["w_ref"].t() + (bias.float() if bias is not None else 0.0)
                    r = record(**bench_ours(o, x, bias, ref, args,
                                            tag=dict(layer=name, group_size=group, sym=sym, main=False)))
                    log(f"quick {name} w{bits} g{group} sym={sym} M={m}: {_fmt(r.get('t_us'), '.1f')} us "
                        f"err {_fmt(r.get('rel_err'), '.1e')}")
                del ck, o
    dump(args, final=False)

    # ---- the LM head: W8 and W4 beside bf16 (after everything else: it is extra)
    if elapsed() < args.head_budget:
        del bf16
        if not DRY:
            torch.cuda.empty_cache()
        bench_head(args, dev, dtype, gen, nc_fn)
    else:
        META["notes"].append("lm_head: not run (--head-budget)")
    dump(args, final=False)


def tune(args, built, xs, dtype) -> None:
    specs, plan = [], []
    for (name, bits), e in built.items():
        if DRY and name != args.layers[0]:
            continue
        o = e["ours"]
        for m in [mm for mm in args.ms if mm in args.tune_ms]:
            cands = candidates(bits, m, META["sms"], META["arch"], DRY)[: args.max_candidates]
            plan.append((name, bits, m, cands))
            specs += [spec_for(bits, o.group, o.n, o.k, m, dtype, c, e["bias"] is not None) for c in cands]
    prewarm(specs, args.procs)
    for name, bits, m, cands in plan:
        if elapsed() > args.tune_budget:
            META["notes"].append(f"tune budget: stopped before {name} w{bits} M={m}")
            break
        e = built[(name, bits)]
        o = e["ours"]
        best = None
        for c in cands:
            r = bench_ours(o, xs[name][m], e["bias"], e["refs"][m], args, cfg=c,
                           tag=dict(layer=name, group_size=128, sym=False, main=False, tune=True))
            record(**r)
            ok = r.get("t_us") is not None and r.get("finite") and (r.get("rel_err") or 1) < REL_ERR_MAX
            if ok and (best is None or r["t_us"] < best[0]):
                best = (r["t_us"], c)
        if best is None:
            continue
        TUNE_BEST[(name, bits, m)] = best[0]
        TUNED.setdefault(f"w{bits}g{o.group}:{o.n}x{o.k}", {})[str(m)] = best[1].to_dict()
        log(f"tuned {name} w{bits} M={m}: {best[0]:.1f} us with {best[1].to_dict()}")
    path = write_tuned(Path(args.out), META["gpu"], args.install)
    META["tuned_file"] = str(path) if path else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU run through the Triton interpreter on tiny shapes")
    ap.add_argument("--tune", action="store_true", help="search launch configs per (layer, bits, M) and write them")
    ap.add_argument("--install", action="store_true", help="with --tune: copy the tuned file into vllm_plugin/kernels/configs/")
    ap.add_argument("--out", default=os.environ.get("VLMPTQ_BENCH_OUT", str(REPO / "benchmarks" / "results")),
                    help="output directory for kernels-<gpu>-<date>.{json,md} and tuned/")
    ap.add_argument("--ms", default=None, help="comma-separated M values (default 1,16,64,256; dry 1,3,16)")
    ap.add_argument("--bits", default="3,2,4", help="comma-separated bit widths, in run order")
    ap.add_argument("--layers", default=None, help="comma-separated layer names (default all 4; dry qkv,o)")
    ap.add_argument("--reps", type=int, default=15, help="timed graph replays (median reported)")
    ap.add_argument("--min-calls", type=int, default=16, help="calls per captured graph")
    ap.add_argument("--l2-mult", type=float, default=3.0, help="rotating weight set >= this many x L2")
    ap.add_argument("--max-copies", type=int, default=48, help="cap on rotating weight copies")
    ap.add_argument("--tune-ms", default="1,16,64,256", help="M values to tune (subset of --ms)")
    ap.add_argument("--max-candidates", type=int, default=18, help="tuning candidates per (layer, bits, M)")
    ap.add_argument("--procs", type=int, default=8, help="parallel compile processes (0/1: compile lazily)")
    ap.add_argument("--budget", type=float, default=210.0, help="soft budget (s) for starting benchmark work")
    ap.add_argument("--quick-budget", type=float, default=450.0, help="soft budget (s, from start) for sym/g32/g64 checks")
    ap.add_argument("--tune-budget", type=float, default=400.0, help="soft budget (s, from start) for tuning")
    ap.add_argument("--head-budget", type=float, default=470.0,
                    help="soft budget (s, from start) for the lm_head timings (W8 / W4 / bf16, 152064 x 3584)")
    ap.add_argument("--head-tune-budget", type=float, default=530.0,
                    help="soft budget (s, from start) for the W8 lm_head launch search (with --tune)")
    ap.add_argument("--hard", type=float, default=560.0, help="hard limit (s): write what we have and exit")
    ap.add_argument("--no-humming", action="store_true", help="skip Humming")
    ap.add_argument("--no-graph", action="store_true", help="time eagerly instead of CUDA graphs")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args()
    args.ms = [int(v) for v in (args.ms or ("1,3" if DRY else "1,16,64,256")).split(",")]
    args.bits = [int(v) for v in args.bits.split(",")]
    args.tune_ms = [int(v) for v in args.tune_ms.split(",")] if not DRY else args.ms
    args.layers = (args.layers or ("qkv,o" if DRY else "qkv,o,gate_up,down")).split(",")
    if DRY:
        args.reps, args.procs, args.tune = 1, 0, True
    os.environ.setdefault("HUMMING_CACHE_DIR", os.path.join(tempfile.gettempdir(), "humming_cache"))
    os.environ.setdefault("HUMMING_TMP_DIR", os.path.join(tempfile.gettempdir(), "humming_tmp"))
    import vllm_plugin.kernels.triton.ops  # noqa: F401  (registers torch.ops.vlmptq.wna16_gemm)

    def hard_stop():
        log(f"HARD LIMIT {args.hard:.0f}s: writing partial results")
        with contextlib.suppress(Exception):
            dump(args, final=True)
        os._exit(3)

    wd = threading.Timer(args.hard, hard_stop)
    wd.daemon = True
    wd.start()
    signal.signal(signal.SIGTERM, lambda *_: hard_stop())
    try:
        run(args)
    except Exception:
        traceback.print_exc()
        META["notes"].append("run aborted: " + traceback.format_exc(limit=3)[-400:])
    finally:
        wd.cancel()
        dump(args, final=True)
    if any(r.get("impl") == "vlmptq" and r.get("main") and (r.get("error") or (r.get("rel_err") or 0) > REL_ERR_MAX)
           for r in RECORDS):
        sys.exit(1)


if __name__ == "__main__":
    main()
