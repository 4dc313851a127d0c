#!/usr/bin/env python3
"""Fused MoE benchmark: vlmptq's grouped W2/W3/W4 expert kernel vs a bf16 grouped GEMM, same run, same card.

Shape: one Qwen3-VL-30B-A3B mixture-of-experts block (128 experts, hidden 2048, expert intermediate 768, top-8
routing), bf16 activations, T tokens in {1, 16, 64, 256}, asymmetric group-128 weights. Both paths do the whole
block: align the routed rows by expert, gate/up GEMM, SiLU-and-multiply, down GEMM scaled by the routing
weights, sum per token. The anchor is ``torch._grouped_mm`` (CUTLASS grouped GEMM, bf16, sm90) on the
dequantized weights; where torch has none (older GPUs, the CPU) a per-expert loop of ``F.linear``, which
is named in the table.

Each timed call routes its tokens anew (16 pre-drawn routings, cycled inside one CUDA graph), so the experts it
touches come from HBM, not from L2 (a routing touches ~8 x T experts' 4.7 M weights; all 128 take 0.6 G).
``bw`` = (weights and scales of the experts touched + activations) / time / the measured copy bandwidth.
Everything is checked against the fp32 dequantized reference (relative Frobenius error).

  python benchmarks/moe_kernels.py            GPU: writes moe-kernels-<gpu>-<date>.{json,md} under --out
  python benchmarks/moe_kernels.py --dry      CPU, Triton interpreter, tiny shapes: control flow only
"""

from __future__ import annotations

import sys

from kernels import DRY, REPO, log, measure_copy_bw, time_calls  # noqa: E402  (first: --dry sets the interpreter)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _results import git_commit  # noqa: E402

from vllm_plugin.kernels.reference import dequantize_packed  # noqa: E402
from vllm_plugin.kernels.triton import moe  # noqa: E402
from vllm_plugin.kernels.triton.configs import gpu_key  # noqa: E402

BLOCK = dict(experts=128, hidden=2048, inter=768, top_k=8)  # Qwen3-VL-30B-A3B
DRY_BLOCK = dict(experts=8, hidden=256, inter=128, top_k=2)
ROUTINGS = 16


def routings(tokens: int, experts: int, top_k: int, gen: torch.Generator) -> list[tuple]:
    out = []
    for _ in range(ROUTINGS):
        w, ids = torch.softmax(torch.randn(tokens, experts, generator=gen, device=gen.device), -1).topk(top_k, dim=-1)
        out.append((ids.to(torch.int32), w / w.sum(-1, keepdim=True)))
    return out


def bf16_block(x, ids, weights, w13, w2, grouped: bool):
    """The anchor: the same block in bf16 with torch's grouped GEMM (``grouped``) or a per-expert loop."""
    t, k = ids.shape
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    xs = x[order // k]
    if grouped:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
        inter = h.shape[1] // 2
        y = torch._grouped_mm((F.silu(h[:, :inter]) * h[:, inter:]).contiguous(), w2.transpose(1, 2), offs=offs)
    else:  # host loop (not capturable; eager timing)
        y = torch.empty((flat.numel(), w2.shape[1]), dtype=x.dtype, device=x.device)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                h = F.linear(xs[start:start + c], w13[e])
                inter = h.shape[1] // 2
                y[start:start + c] = F.linear(F.silu(h[:, :inter]) * h[:, inter:], w2[e])
                start += c
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    out = torch.empty_like(y)
    out[order] = y
    return out.view(t, k, -1).sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="CPU run through the Triton interpreter on tiny shapes")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts (default 1,16,64,256; dry 1,3)")
    ap.add_argument("--bits", default="4,3,2", help="comma-separated bit widths")
    ap.add_argument("--group", type=int, default=128, help="group size")
    ap.add_argument("--reps", type=int, default=15, help="timed graph replays (median reported)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results directory")
    args = ap.parse_args()
    if not DRY and not torch.cuda.is_available():
        sys.exit("benchmarks/moe_kernels.py times a CUDA GPU and torch sees none here; --dry runs its flow on the CPU")
    dev = torch.device("cpu" if DRY else "cuda")
    dtype = torch.float16 if DRY else torch.bfloat16  # the interpreter's tl.dot cannot take bf16
    shape = DRY_BLOCK if DRY else BLOCK
    e_, h, i, top_k = shape["experts"], shape["hidden"], shape["inter"], shape["top_k"]
    tokens = [int(v) for v in (args.tokens or ("1,3" if DRY else "1,16,64,256")).split(",")]
    gpu = "dry-cpu" if DRY else torch.cuda.get_device_name(0)
    copy_bw = measure_copy_bw(1 << 30)
    log(f"{gpu}: copy bandwidth {copy_bw:.0f} GB/s; block {shape}, {dtype}, tokens {tokens}")
    gen = torch.Generator(device=dev).manual_seed(0)  # weights made on the device: 128 experts in seconds
    records = []
    grouped = hasattr(torch, "_grouped_mm") and not DRY
    bit_widths = [int(b) for b in args.bits.split(",")]
    for bits in bit_widths:
        ex = moe.random_experts(e_, h, i, bits, args.group, dtype, gen)
        w13 = moe.repack_experts(ex["w13"], bits, h, dtype)
        w2 = moe.repack_experts(ex["w2"], bits, i, dtype)
        per_expert = sum(t.numel() * t.element_size() for t in (*w13, *w2)) / e_
        anchor = bits == bit_widths[0]  # the bf16 anchor is the same for every bit width: once per T
        dense = {"w13": torch.stack([torch.cat([dequantize_packed(*p, bits, h) for p in s]) for s in ex["w13"]]),
                 "w2": torch.stack([dequantize_packed(*s[0], bits, i) for s in ex["w2"]])} if anchor else None
        for t in tokens:
            x = torch.randn(t, h, generator=gen, device=dev).to(dtype)
            routes = routings(t, e_, top_k, gen)
            ref = moe.reference_moe(x, *routes[0], ex, bits, "silu")
            touched = sum(len(torch.unique(ids)) for ids, _ in routes) / len(routes)
            act_bytes = 2 * (2 * t * h + 2 * t * top_k * (i + h))  # x, out; [R, I] and [R, H] written and read
            impls = {"vlmptq": (lambda ids, w: torch.ops.vlmptq.wna16_moe(x, ids, w, *w13, *w2, bits, "silu"),
                                per_expert),
                     "bf16": (lambda ids, w: bf16_block(x, ids, w, dense["w13"], dense["w2"], grouped), 3 * h * i * 2)}
            for impl, (fn, expert_bytes) in impls.items():
                rec = {"T": t, "impl": impl, "bits": bits if impl == "vlmptq" else None, "group_size": args.group,
                       "experts": e_, "hidden": h, "inter": i, "top_k": top_k, "experts_touched": touched}
                if impl == "bf16" and not anchor:
                    continue
                try:
                    if impl == "bf16" and grouped:
                        try:
                            fn(*routes[0])
                        except Exception as exc:  # e.g. no CUTLASS grouped GEMM for this card: the loop
                            log(f"torch._grouped_mm failed ({type(exc).__name__}: {str(exc)[:200]}); "
                                "the anchor is a per-expert loop")
                            grouped = False
                    y = fn(*routes[0])
                    rec["rel_err"] = ((y.float() - ref).norm() / ref.norm()).item()
                    rec["finite"] = bool(torch.isfinite(y).all())
                    calls = [lambda r=r: fn(*r) for r in routes]
                    capturable = impl == "vlmptq" or grouped
                    rec["t_us"], rec["mode"] = time_calls(calls, args.reps, use_graph=capturable)
                    rec["anchor"] = "torch._grouped_mm" if impl == "bf16" and capturable else (
                        "per-expert F.linear loop" if impl == "bf16" else None)
                    moved = touched * expert_bytes + act_bytes
                    rec["gbs"] = moved / rec["t_us"] / 1e3
                    rec["bw_frac"] = rec["gbs"] / copy_bw
                except Exception as exc:  # recorded, the run goes on
                    rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                records.append(rec)
                log(f"w{bits} T={t} {impl}: " + (rec.get("error") or f"{rec['t_us']:.1f} us ({rec['mode']}), "
                    f"{rec['bw_frac']:.0%} of copy BW, rel_err {rec['rel_err']:.1e}"))
    write(args, gpu, copy_bw, records)


def write(args, gpu: str, copy_bw: float, records: list[dict]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"moe-kernels-{gpu_key(gpu)}-{datetime.date.today().isoformat()}"
    payload = {"gpu": gpu, "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
               "command": " ".join([sys.executable] + sys.argv), "copy_bw_gbs": copy_bw, "records": records}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    anchor = {r["T"]: r for r in records if r["impl"] == "bf16" and "t_us" in r}
    lines = [f"# Fused MoE benchmark {gpu} {payload['date']}", "",
             f"commit {payload['commit']}, copy bandwidth {copy_bw:.0f} GB/s. One MoE block "
             f"({records[0]['experts']} experts, hidden {records[0]['hidden']}, intermediate {records[0]['inter']}, "
             f"top-{records[0]['top_k']}), g{args.group} asym, whole block per call (align, gate/up, act, down, sum), "
             "CUDA graphs, a fresh routing per call.", "",
             "| T | impl | bits | us | x bf16 | bw | rel err |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if "t_us" not in r:
            lines.append(f"| {r['T']} | {r['impl']} | {r['bits'] or 16} | error: {r.get('error', '')[:80]} | | | |")
            continue
        speed = anchor[r["T"]]["t_us"] / r["t_us"] if r["T"] in anchor else float("nan")
        name = r["impl"] if r["impl"] != "bf16" else f"bf16 ({r['anchor']})"
        lines.append(f"| {r['T']} | {name} | {r['bits'] or 16} | {r['t_us']:.1f} | {speed:.2f} | "
                     f"{r['bw_frac']:.0%} | {r['rel_err']:.1e} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
