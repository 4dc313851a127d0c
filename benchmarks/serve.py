#!/usr/bin/env python3
"""Serving benchmark: vLLM's OpenAI server on 127.0.0.1, ``vllm bench serve --dataset-name
random-mm`` against the unquantized model, vLLM's stock 4-bit path and the vlmptq plugin.

Runs (each one a fresh server, same flags, one after the other; ``--repeats`` interleaves rounds):
    bf16              the original model, stock vLLM
    stock W4          the W4 checkpoint with ``--quantization compressed-tensors`` (vLLM's CPUWNA16
                      on CPU; on AMX machines it rounds activations to int8, VLLM_CPU_INT4_W4A8=1)
    vlmptq W{2,3,4}   each checkpoint with ``--quantization vlmptq``
    (--a16 adds stock W4 and vlmptq W4 with VLLM_CPU_INT4_W4A8=0: bf16 activations on both)
A GEMM table (the decoder layer's four GEMMs, same thread count as the server's engine) times torch
bf16, vLLM's CPUWNA16 kernel and the kernel the plugin picks on the same weights.

Results: ``benchmarks/results/serve-<date>.{md,json}`` with machine, date, git commit and command.

Without ``--model``/``--quantized`` it builds a small random Qwen2-VL (``--hidden`` etc.; default
~45 M parameters, large enough that the GEMMs, not the HTTP path, dominate decode) with a locally
trained tokenizer, and RTN checkpoints of it through ``vlmptq.quantize``. Everything is offline.

    python benchmarks/serve.py                      # default model, W2/W3/W4
    python benchmarks/serve.py --model M --quantized M-w4 M-w3 --num-prompts 64
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
logger = logging.getLogger("benchmarks.serve")

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import git_commit, machine_info  # noqa: E402

from vlmptq.server import VllmServer, project_env, vllm_command  # noqa: E402


# ----------------------------------------------------------------------------- the load


@dataclass
class BenchLoad:
    num_prompts: int = 32
    max_concurrency: int = 4
    input_len: int = 64
    output_len: int = 64
    image_size: int = 224
    warmups: int = 2
    seed: int = 0


def run_bench(server: VllmServer, tokenizer: str | Path, load: BenchLoad, out_json: Path) -> dict:
    """``vllm bench serve --dataset-name random-mm``, one image per chat request; its JSON."""
    cmd = [
        *vllm_command(),
        "bench",
        "serve",
        "--backend",
        "openai-chat",
        "--endpoint",
        "/v1/chat/completions",
        "--base-url",
        server.base_url,
        "--model",
        server.model,
        "--tokenizer",
        str(tokenizer),
        "--dataset-name",
        "random-mm",
        "--num-prompts",
        str(load.num_prompts),
        "--max-concurrency",
        str(load.max_concurrency),
        "--num-warmups",
        str(load.warmups),
        "--random-input-len",
        str(load.input_len),
        "--random-output-len",
        str(load.output_len),
        "--ignore-eos",
        "--random-mm-base-items-per-request",
        "1",
        "--random-mm-limit-mm-per-prompt",
        '{"image": 1, "video": 0}',
        "--random-mm-bucket-config",
        f"{{({load.image_size}, {load.image_size}, 1): 1.0}}",
        "--seed",
        str(load.seed),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(out_json.parent),
        "--result-filename",
        out_json.name,
        "--disable-tqdm",
    ]
    out_json.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=project_env(root=ROOT), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 or not out_json.exists():
        raise RuntimeError(
            "vllm bench serve failed "
            f"({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    result = json.loads(out_json.read_text())
    result["command"] = shlex.join(cmd)
    return result


# ----------------------------------------------------------------------------- default model


def build_bench_model(
    out: Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int
) -> Path:
    """A random Qwen2-VL (real transformers classes, local BPE tokenizer, Qwen's image processor),
    built offline by the same builder as the test fixtures, at benchmark size."""
    from vlmptq.testing.tiny_vlm import build_tiny_qwen_vl

    if (out / "config.json").exists():
        return out
    return build_tiny_qwen_vl(
        out, "qwen2_vl", num_layers=layers, hidden=hidden, intermediate=intermediate, heads=heads,
        kv_heads=kv_heads, init_std=0.02, max_pixels=448 * 448,
    )


def rtn_checkpoint(model: Path, out: Path, bits: int, group_size: int) -> Path:
    """Round-to-nearest checkpoint through the public API (min-max ranges, 2 calib. samples)."""
    import vlmptq

    if (out / "config.json").exists():
        return out
    config = vlmptq.make_config(
        method="rtn",
        bits=bits,
        group_size=group_size,
        device="cpu",
        solver=vlmptq.SolverOptions(clip_search=False),
        calib=vlmptq.CalibConfig(num_samples=2, max_seq_len=512),
    )
    vlmptq.quantize(model, out, config)
    return out


def checkpoint_bits(path: Path) -> int | None:
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    groups = list((qc.get("config_groups") or {}).values())
    return int(groups[0]["weights"]["num_bits"]) if groups else None


# ----------------------------------------------------------------------------- GEMM table


def decoder_gemm_shapes(model: Path) -> dict[str, tuple[int, int]]:
    """(N, K) of the fused qkv, o, gate_up and down GEMMs of one decoder layer."""
    cfg = json.loads((model / "config.json").read_text())
    t = cfg.get("text_config", cfg)
    h, i, nh, kv = (
        t["hidden_size"],
        t["intermediate_size"],
        t["num_attention_heads"],
        t["num_key_value_heads"],
    )
    d = h // nh
    return {"qkv": ((nh + 2 * kv) * d, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i)}


def gemm_table(
    shapes: dict[str, tuple[int, int]],
    bits_list: list[int],
    group: int,
    ms: list[int],
    threads: int,
    reps: int = 20,
    reference: bool = False,
) -> list[dict]:
    """Median ms per M and implementation, summed over ``shapes`` (one decoder layer's GEMMs, or
    any ``{name: (N, K)}``); ``reference`` adds the torch reference kernel per bit width."""
    import torch
    import vllm._custom_ops  # noqa: F401  (loads vLLM's CPU GEMMs into torch.ops._C)
    from vllm import envs

    from vlmptq.checkpoint.packing import pack_columns, pack_rows
    from vllm_plugin.kernels import WNA16LayerConfig, choose_kernel

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)

    def layer(n, k, bits):
        codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
        zeros = torch.randint(0, 1 << bits, (n, k // group), generator=g, dtype=torch.uint8)
        scale = (torch.rand(n, k // group, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
        return pack_rows(codes, bits), scale, pack_columns(zeros, bits)

    def timed(fn, x):
        for _ in range(3):
            fn(x)
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e3

    impls: dict[str, list] = {
        "torch bf16 (dense)": [],
        "stock CPUWNA16 W4 (w4a8)": [],
        "stock CPUWNA16 W4 (a16)": [],
    }
    for bits in bits_list:
        impls[f"vlmptq W{bits}"] = []
    if reference:
        from vllm_plugin.kernels.reference import ReferenceWNA16Kernel

        for bits in bits_list:
            impls[f"torch reference W{bits}"] = []
    names = {}
    for n, k in shapes.values():
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        impls["torch bf16 (dense)"].append(lambda x, w=w: torch.nn.functional.linear(x, w))
        wp4, s4, z4 = layer(n, k, 4)
        for mode in ("w4a8", "a16"):
            impls[f"stock CPUWNA16 W4 ({mode})"].append(
                _stock_cpuwna16(wp4, s4, z4, n, k, group, mode == "w4a8", envs)
            )
        for bits in bits_list:
            wp, s, z = layer(n, k, bits)
            cfg = WNA16LayerConfig(bits, group, False, k, n, torch.bfloat16, "cpu")
            kern = choose_kernel(cfg)(cfg)
            names[bits] = kern.name
            tensors = kern.prepare(wp, s, z)
            impls[f"vlmptq W{bits}"].append(lambda x, kern=kern, t=tensors: kern.apply(t, x))
            if reference:
                ref = ReferenceWNA16Kernel(cfg)
                impls[f"torch reference W{bits}"].append(
                    lambda x, ref=ref, t=ref.prepare(wp, s, z): ref.apply(t, x))
    rows = []
    for label, fns in impls.items():
        row = {
            "implementation": label
            + (f" [{names[int(label[-1])]}]" if label.startswith("vlmptq") else "")
        }
        for m in ms:
            row[f"M={m}"] = sum(
                timed(fn, torch.randn(m, k, generator=g).to(torch.bfloat16))
                for fn, (n, k) in zip(fns, shapes.values(), strict=True)
            )
        rows.append(row)
    return rows


def _stock_cpuwna16(wp, scale, zp, n, k, group, w4a8, envs):
    """vLLM's own CPUWNA16 kernel on a stand-in layer (parameters carry the attributes it reads)."""
    import torch
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
        MPLinearLayerConfig,
    )
    from vllm.scalar_type import scalar_types

    def param(t, **attrs):
        p = torch.nn.Parameter(t.clone(), requires_grad=False)
        for a, v in attrs.items():
            setattr(p, a, v)
        return p

    layer = torch.nn.Module()
    layer.weight_packed = param(wp, input_dim=1, output_dim=0, packed_dim=1)
    layer.weight_scale = param(scale, input_dim=1, output_dim=0)
    layer.weight_zero_point = param(zp, input_dim=1, output_dim=0, packed_dim=0)
    layer.bias = None
    old = os.environ.get("VLLM_CPU_INT4_W4A8")
    os.environ["VLLM_CPU_INT4_W4A8"] = "1" if w4a8 else "0"
    try:
        cfg = MPLinearLayerConfig((k, n), (k, n), scalar_types.uint4, torch.bfloat16, group, True)
        kernel = CPUWNA16LinearKernel(cfg, "weight_packed", "weight_scale", "weight_zero_point")
        kernel.process_weights_after_loading(layer)
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_INT4_W4A8")
        else:
            os.environ["VLLM_CPU_INT4_W4A8"] = old
    return lambda x: kernel.apply_weights(layer, x)


# ----------------------------------------------------------------------------- report


@dataclass
class Run:
    label: str
    model: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)
    exit_codes: list[int | None] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)  # 1-min load average after each bench
    error: str | None = None


METRICS = [
    ("req/s", "request_throughput"),
    ("out tok/s", "output_throughput"),
    ("mean TTFT ms", "mean_ttft_ms"),
    ("p50 TTFT ms", "median_ttft_ms"),
    ("mean TPOT ms", "mean_tpot_ms"),
    ("p50 TPOT ms", "median_tpot_ms"),
]


def summarize(run: Run) -> dict:
    row = {"run": run.label, "checkpoint": run.model.name, "kernels": "; ".join(run.kernels) or "-"}
    if run.error:
        row["error"] = run.error
        return row
    for name, key in METRICS:
        row[name] = statistics.median(r[key] for r in run.results)
    row["completed"] = sum(r["completed"] for r in run.results)
    row["failed"] = sum(r.get("failed", 0) for r in run.results)
    row["server exit"] = ",".join(str(c) for c in run.exit_codes)
    row["load avg"] = ",".join(f"{x:.1f}" for x in run.loads)
    return row


def markdown(report: dict) -> str:
    m, load = report["machine"], report["load"]
    lines = [
        f"# Serving benchmark, {report['date']}",
        "",
        f"- git commit: `{report['git_commit']}`",
        f"- machine: {m.get('cpu', '?')}, {m['cpus']} CPUs, {m.get('mem_gib', '?')} GiB, AMX "
        f"{m['amx']}; "
        f"{m['platform']}",
        f"- software: torch {m['torch']}, vllm-cpu {m.get('vllm-cpu', m.get('vllm', '?'))}, "
        f"transformers {m.get('transformers', '?')}, compressed-tensors "
        f"{m.get('compressed-tensors', '?')}",
        f"- command: `{report['command']}`",
        f"- model: {report['model_note']}",
        f"- load: `vllm bench serve --dataset-name random-mm`, {load['num_prompts']} chat "
        "requests x "
        f"{report['repeats']} round(s), 1 image {load['image_size']}x{load['image_size']} + "
        f"{load['input_len']} text tokens in, {load['output_len']} tokens out (ignore_eos), "
        f"max concurrency {load['max_concurrency']}; server flags `{report['server_args']}`",
        "- values: median over rounds; failures and completions summed; load avg = the machine's "
        "1-minute load average after each round (above the core count, other jobs shared the CPUs)",
        "",
        "## Serving",
        "",
    ]
    cols = [
        "run",
        "checkpoint",
        *[n for n, _ in METRICS],
        "completed",
        "failed",
        "server exit",
        "load avg",
        "kernels",
    ]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in report["serving"]:
        if "error" in row:
            lines.append(f"| {row['run']} | {row['checkpoint']} | error: {row['error'][:200]} |")
            continue
        cells = [
            f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("gemm"):
        g = report["gemm"]
        lines += [
            "",
            "## GEMMs of one decoder layer "
            f"({', '.join(f'{k} {n}x{kk}' for k, (n, kk) in g['shapes'].items())}; "
            f"g{g['group_size']} asym; {g['threads']} thread(s); median ms, sum of the four)",
            "",
        ]
        ms = [c for c in g["rows"][0] if c.startswith("M=")]
        lines += ["| implementation | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]
        for row in g["rows"]:
            lines.append(
                f"| {row['implementation']} | " + " | ".join(f"{row[c]:.3f}" for c in ms) + " |"
            )
    if report.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", type=Path, help="unquantized original (default: build the benchmark model)"
    )
    p.add_argument(
        "--quantized",
        type=Path,
        nargs="+",
        help="quantized checkpoints of --model (default: RTN W2/W3/W4)",
    )
    p.add_argument(
        "--bits",
        type=int,
        nargs="+",
        default=[2, 3, 4],
        help="bit widths of the default checkpoints",
    )
    p.add_argument(
        "--group-size", type=int, default=128, help="group size of the default checkpoints"
    )
    p.add_argument(
        "--hidden", type=int, default=1024, help="default model: hidden size (head_dim is 64)"
    )
    p.add_argument(
        "--intermediate", type=int, default=2816, help="default model: MLP intermediate size"
    )
    p.add_argument("--layers", type=int, default=4, help="default model: decoder layers")
    p.add_argument("--kv-heads", type=int, default=4, help="default model: key/value heads")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=ROOT / ".tmp" / "bench-serve",
        help="models, logs, raw results",
    )
    p.add_argument("--num-prompts", type=int, default=32, help="requests per run and round")
    p.add_argument(
        "--max-concurrency", type=int, default=4, help="concurrent requests (also --max-num-seqs)"
    )
    p.add_argument(
        "--input-len", type=int, default=64, help="random text tokens per request (plus the image)"
    )
    p.add_argument("--output-len", type=int, default=64, help="generated tokens per request")
    p.add_argument("--image-size", type=int, default=224, help="square image side in pixels")
    p.add_argument(
        "--repeats", type=int, default=1, help="rounds over all runs (interleaved against drift)"
    )
    p.add_argument(
        "--a16", action="store_true", help="also run stock and vlmptq W4 with VLLM_CPU_INT4_W4A8=0"
    )
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile in the servers")
    p.add_argument("--no-gemm", action="store_true", help="skip the GEMM table")
    p.add_argument(
        "--gemm-threads",
        type=int,
        default=1,
        help="threads for the GEMM table (the CPU engine uses 1 on 2 cores)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="where serve-<date>.md/.json go")
    p.add_argument(
        "--startup-timeout", type=float, default=900, help="seconds to wait for each server"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        name = f"qwen2vl-h{args.hidden}-i{args.intermediate}-l{args.layers}"
        logger.info("building the benchmark model %s", name)
        args.model = build_bench_model(
            work / name,
            args.hidden,
            args.intermediate,
            args.layers,
            args.hidden // 64,
            args.kv_heads,
        )
        model_note = (
            f"random Qwen2-VL built by benchmarks/serve.py: hidden {args.hidden}, intermediate "
            f"{args.intermediate}, {args.layers} decoder layers, {args.hidden // 64} heads / "
            f"{args.kv_heads} KV heads, 2-layer vision tower; RTN checkpoints via vlmptq.quantize, "
            f"g{args.group_size} asym"
        )
        if args.quantized is None:
            args.quantized = [
                rtn_checkpoint(
                    args.model, work / f"{name}-w{b}g{args.group_size}", b, args.group_size
                )
                for b in args.bits
            ]
    else:
        model_note = f"{args.model} (user-supplied)"
    quantized = args.quantized or []

    server_args = [
        "--max-model-len",
        "4096",
        "--max-num-seqs",
        str(args.max_concurrency),
        "--dtype",
        "bfloat16",
        "--kv-cache-memory-bytes",
        str(1 << 30),
        "--limit-mm-per-prompt",
        '{"image": 1}',
        "--seed",
        "0",
        "--disable-log-stats",
    ]
    if args.enforce_eager:
        server_args.append("--enforce-eager")
    runs = [Run("bf16", args.model, [])]
    for ckpt in quantized:
        b = checkpoint_bits(ckpt)
        if b == 4:
            runs.append(Run("stock W4 (CPUWNA16)", ckpt, ["--quantization", "compressed-tensors"]))
            if args.a16:
                runs.append(
                    Run(
                        "stock W4 a16",
                        ckpt,
                        ["--quantization", "compressed-tensors"],
                        {"VLLM_CPU_INT4_W4A8": "0"},
                    )
                )
        runs.append(Run(f"vlmptq W{b}", ckpt, ["--quantization", "vlmptq"]))
        if b == 4 and args.a16:
            runs.append(
                Run(
                    "vlmptq W4 a16", ckpt, ["--quantization", "vlmptq"], {"VLLM_CPU_INT4_W4A8": "0"}
                )
            )

    load = BenchLoad(
        args.num_prompts, args.max_concurrency, args.input_len, args.output_len, args.image_size
    )
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for rnd in range(args.repeats):
        for i, run in enumerate(runs):
            if run.error:
                continue
            tag = f"{stamp}-r{rnd}-{i}"
            server = VllmServer(
                run.model, run.args + server_args, run.env, log_path=work / "logs" / f"{tag}.log", root=ROOT
            )
            try:
                with server:
                    logger.info("round %d: %s", rnd, run.label)
                    run.results.append(
                        run_bench(server, args.model, load, work / "raw" / f"{tag}.json")
                    )
                run.loads.append(os.getloadavg()[0])  # other work on the machine skews timings
                run.kernels = server.kernels()
            except Exception as e:  # a run that fails is reported, the others still run
                run.error = f"{type(e).__name__}: {e}".splitlines()[0]
                logger.error("%s failed: %s (log %s)", run.label, e, server.log_path)
            run.exit_codes.append(server.proc.returncode if server.proc else None)

    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
        "machine": machine_info(),
        "model_note": model_note,
        "load": load.__dict__,
        "repeats": args.repeats,
        "server_args": shlex.join(server_args),
        "serving": [summarize(r) for r in runs],
        "raw": {r.label: r.results for r in runs},
    }
    if not args.no_gemm:
        shapes = decoder_gemm_shapes(args.model)
        report["gemm"] = {
            "shapes": shapes,
            "group_size": args.group_size,
            "threads": args.gemm_threads,
            "rows": gemm_table(
                shapes,
                sorted({checkpoint_bits(c) for c in quantized} - {None}),
                args.group_size,
                [1, 16, 128],
                args.gemm_threads,
            ),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"serve-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    base.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    logger.info("wrote %s.{md,json}", base)
    return 0 if all(not r.error and summarize(r).get("failed") == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
