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
  python benchmarks/moe_kernels.py --tune     also search each T's two launches (gate/up, then down with its
                                              row tile), write <out>/tuned/<gpu>.json (moe- keys; --install:
                                              also into the plugin's config dir, where moe_config reads them)
  python benchmarks/moe_kernels.py --dry      CPU, Triton interpreter, tiny shapes: control flow only

A tuned entry is keyed by the launch's weight shape and the M bucket the kernel looks up at run time (routed
rows per active expert, ``moe.rows_per_expert``); only configs whose output matches the reference are kept.
"""

from __future__ import annotations

import sys

from kernels import DRY, REPO, elapsed, log, measure_copy_bw, time_calls, write_tuned  # noqa: E402  (first: --dry)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _results import git_commit  # noqa: E402

from vllm_plugin.kernels.reference import dequantize_packed  # noqa: E402
from vllm_plugin.kernels.triton import moe  # noqa: E402
from vllm_plugin.kernels.triton.configs import KernelConfig, fit_smem, gpu_key  # noqa: E402
from vllm_plugin.kernels.triton.ops import _device_info  # noqa: E402

BLOCK = dict(experts=128, hidden=2048, inter=768, top_k=8)  # Qwen3-VL-30B-A3B
DRY_BLOCK = dict(experts=8, hidden=256, inter=128, top_k=2)
ROUTINGS = 16
REL_ERR_MAX = 2e-2  # a tuned launch must match the fp32 reference like the default does (measured ~4e-3 in bf16)


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
    ap.add_argument("--tune", action="store_true", help="search each launch's tile per T (see the module docstring)")
    ap.add_argument("--tune-budget", type=float, default=300.0,
                    help="seconds of searching (from the start of the run) after which --tune stops, noted in the log")
    ap.add_argument("--max-candidates", type=int, default=10, help="candidate tiles per launch and T")
    ap.add_argument("--install", action="store_true", help="with --tune: copy the tuned file into the plugin")
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
    tuned: dict = {}
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
            ours = next((r for r in records if r["T"] == t and r["impl"] == "vlmptq" and r["bits"] == bits), {})
            if args.tune and "t_us" in ours:
                rec = tune_block(args, x, routes, ref, w13, w2, bits, tuned, ours)
                records += [rec] if rec else []
    write(args, gpu, copy_bw, records)
    if args.tune:
        write_tuned(Path(args.out), gpu, args.install, tuned)


def moe_candidates(bits: int, rows: int, arch: int, dry: bool) -> list[KernelConfig]:
    """A small, ordered search space of grouped-GEMM tiles for ``rows`` routed rows per expert (the kernel's
    default first): row tiles from 16 (decode, unsorted rows) up to the rows' size, output tiles, warps and
    pipelining depth. Every one is a "dot" tile (the grouped kernel has no dequantize path)."""
    base = moe.default_moe_config(bits, rows, arch)
    out = [base]
    if dry:
        return list(dict.fromkeys([base, replace(base, block_n=64 if base.block_n != 64 else 32)]))
    row_tiles = [bm for bm in (16, 32, 64, 128) if bm <= max(16, rows)] or [16]
    for bm in row_tiles[-2:]:
        for bn, warps, stages in ((64, 4, 3), (128, 4, 3), (128, 4, 4), (256, 8, 3), (128, 8, 3), (64, 4, 4)):
            out.append(fit_smem(KernelConfig("dot", block_n=bn, block_m=bm, num_warps=warps, num_stages=stages), bits,
                                arch))
    return list(dict.fromkeys(out))


def tune_block(args, x, routes, ref, w13, w2, bits: int, tuned: dict, default_rec: dict) -> dict | None:
    """Search the gate/up launch's tile (down at its default with the same row tile), then the down launch's with
    the winner's row tile, on this T's routings; a pair that matches the reference and beats the default
    (``default_rec``, the untuned timing) goes under its two ``moe-`` keys in ``tuned``, and its record (impl
    "vlmptq-tuned") is returned."""
    t, h = x.shape
    e, _, n13, _ = w13[0].shape
    inter, top_k = n13 // 2, routes[0][0].shape[1]
    sort = moe.sorts(t * top_k, e, top_k)
    bucket = moe.rows_per_expert(t * top_k, e, sort)
    arch = _device_info(str(x.device))[2]  # the CPU under --dry counts as an H100, as in the kernel
    cands = moe_candidates(bits, bucket, arch, DRY)[: args.max_candidates]
    default2 = moe.moe_config(str(x.device), bits, args.group, h, inter, bucket)  # what the kernel uses now

    def timed(c13, c2):
        fn = lambda ids, w: moe.fused_moe(x, ids, w, *w13, *w2, bits, "silu", configs=(c13, c2), sort=sort)  # noqa
        try:
            y = fn(*routes[0])
            err = ((y.float() - ref).norm() / ref.norm()).item()
            if not (torch.isfinite(y).all() and err < REL_ERR_MAX):
                return None
            return time_calls([lambda r=r: fn(*r) for r in routes], args.reps)[0], err
        except Exception as exc:  # e.g. out of shared memory on this card: not a candidate
            log(f"  tune w{bits} T={t}: {c13} / {c2} failed ({type(exc).__name__}: {str(exc)[:120]})")
            return None

    best = None  # (us, rel_err, c13, c2)
    for stage in ("gate/up", "down"):
        for c in cands:
            if elapsed() > args.tune_budget:
                log(f"tune: stopped for time at w{bits} T={t} ({stage}); the rest keeps the defaults")
                return None
            pair = (c, replace(default2, block_m=c.block_m)) if stage == "gate/up" else (
                best[2], replace(c, block_m=best[2].block_m))
            r = timed(*pair)
            if r is not None and (best is None or r[0] < best[0]):
                best = (r[0], r[1], *pair)
        if best is None:
            log(f"tune w{bits} T={t}: no candidate matched the reference")
            return None
    if best[0] >= default_rec["t_us"] and not DRY:  # (--dry times are the interpreter's: the flow is what counts)
        log(f"tune w{bits} T={t}: no tile beat the default ({default_rec['t_us']:.1f} us)")
        return None
    key13, key2 = (f"moe-w{bits}g{args.group}:{n}x{k}" for n, k in ((n13, h), (h, inter)))
    tuned.setdefault(key13, {})[str(bucket)] = best[2].to_dict()
    tuned.setdefault(key2, {})[str(bucket)] = best[3].to_dict()
    log(f"tune w{bits} T={t}: {best[0]:.1f} us (default {default_rec['t_us']:.1f}) with gate/up "
        f"{best[2].to_dict()}, down {best[3].to_dict()}")
    faster = default_rec["t_us"] / best[0]  # the same bytes moved, in less time
    return dict(default_rec, impl="vlmptq-tuned", t_us=best[0], rel_err=best[1], mode=default_rec["mode"],
                gbs=default_rec["gbs"] * faster, bw_frac=default_rec["bw_frac"] * faster, rows_per_expert=bucket,
                configs={"gate_up": best[2].to_dict(), "down": best[3].to_dict()})


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
