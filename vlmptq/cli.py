"""The ``vlmptq`` command: argument parsing only; the work is done by the library API."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

DESCRIPTION = """\
Quantize a Hugging Face vision-language model's language-model linears to 2/3/4/8-bit weights
(RTN, GPTQ, GPTAQ or VLM-PTQ) and write a compressed-tensors pack-quantized checkpoint that
vLLM serves (stock, or faster with `--quantization vlmptq` and this package's plugin)."""


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    from vlmptq.quant.scheme import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
    from vlmptq.solvers import SOLVERS

    p = sub.add_parser(
        "quantize", help="quantize a model and write a checkpoint",
        description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="Hugging Face model directory (config.json, weights, processor) or Hub id such as "
                        "Qwen/Qwen2.5-VL-7B-Instruct (taken from the Hugging Face cache, fetched if missing)")
    p.add_argument("--out", required=True, help="output directory for the quantized checkpoint (written atomically)")
    p.add_argument("--method", default="vlmptq", choices=sorted(SOLVERS), help="quantization algorithm")
    p.add_argument("--bits", type=int, default=argparse.SUPPRESS, choices=SUPPORTED_BITS,
                   help="weight bits, default 4 (the vLLM plugin's GPU kernels: a fused 2/3/4-bit kernel and an "
                        "8-bit one; docs/kernels.md)")
    p.add_argument("--target-bits", type=float, default=None, metavar="BITS",
                   help="automatic mixed precision instead of --bits: the average code bits per decoder-linear weight "
                        "(e.g. 2.5). A sensitivity pass on the calibration data measures how much each layer's output "
                        "changes with each linear at each of --bits-choices, then the choice with the least summed "
                        "change within the budget is taken (q/k/v, gate/up, a MoE block's experts together; "
                        "--override'n linears keep their scheme and count in the average); docs/mixed-precision.md")
    p.add_argument("--bits-choices", type=int, nargs="+", default=argparse.SUPPRESS, choices=SUPPORTED_BITS,
                   metavar="BITS",
                   help="the bit widths --target-bits chooses from (default: 2 3 4)")
    p.add_argument("--group-size", type=int, default=128, choices=SUPPORTED_GROUP_SIZES,
                   help="input columns sharing one scale/zero point (-1: one per output channel)")
    p.add_argument("--sym", action="store_true", help="symmetric grid without zero points (default: asymmetric)")
    p.add_argument("--lm-head-bits", type=int, default=None, choices=SUPPORTED_BITS,
                   help="also quantize the lm_head (after the last layer, same method and --sym; tied embeddings are "
                        "untied and stay 16-bit); default: keep it in 16-bit")
    p.add_argument("--lm-head-group-size", type=int, default=None, choices=SUPPORTED_GROUP_SIZES,
                   help="the lm_head's group size (default: --group-size)")
    p.add_argument("--override", nargs="+", default=[], metavar="REGEX=BITS[:GROUP]",
                   help="mixed precision: decoder linears whose name matches REGEX take BITS (and GROUP) instead of "
                        "--bits / --group-size, first match wins, e.g. 'mlp\\.down_proj$=4' 'layers\\.0\\.=8'; q/k/v_proj "
                        "and gate/up_proj alike, and a MoE block's experts (vLLM fuses them); a REGEX that takes no "
                        "linear is an error")
    c = p.add_argument_group("calibration data")
    c.add_argument("--calib", default="builtin",
                   help="'builtin' (offline photos + captions), a directory of images with .txt captions, a .jsonl "
                        "file of {image, text[, prompt]} (image: a path or a list of paths; or a .json list of them, "
                        "LLaVA/ShareGPT4V 'conversations' "
                        "records too), or a Hugging Face dataset (name, local path or save_to_disk dir). Text-only "
                        "models calibrate on text: a .txt file, a folder of .txt files, a .jsonl/.json of {text} "
                        "records or a dataset with a text column")
    c.add_argument("--num-samples", type=int, default=128,
                   help="calibration image-text pairs (text-only models: windows of --max-seq-len tokens)")
    c.add_argument("--max-seq-len", type=int, default=2048,
                   help="maximum tokens per calibration sample (text-only models: the window length)")
    c.add_argument("--seed", type=int, default=0, help="seed for sample selection and the built-in set's crops")
    c.add_argument("--split", default="train", help="dataset split (Hugging Face datasets)")
    c.add_argument("--image-column", default="image",
                   help="dataset column / jsonl key with the image, or a list of images (with the default, records "
                        "without an 'image' key are read from 'images')")
    c.add_argument("--text-column", default="text",
                   help="dataset column / jsonl key with the caption (assistant turn), or the text of a text-only "
                        "model's calibration records")
    c.add_argument("--prompt-column", default=None, help="dataset column with the question (default: a fixed prompt)")
    c.add_argument("--image-root", default=None,
                   help="folder that relative image paths in a .jsonl/.json file or dataset start from (default: the "
                        "file's folder); e.g. ShareGPT4V's data/ folder")
    c.add_argument("--max-image-side", type=int, default=None, help="downscale images whose longer side exceeds this")
    c.add_argument("--video-frames", type=int, default=8,
                   help="video records ({video: a video file, frame folder or frame list[, fps]}; Qwen-VL family, "
                        "LLaVA-OneVision): at most this many frames per clip, evenly subsampled (docs/calibration.md)")
    c.add_argument("--video-fps", type=float, default=2.0,
                   help="frame rate of a clip's frames when its record gives no fps")
    c.add_argument("--skip-bad-samples", action="store_true",
                   help="skip (and count) unreadable or too-long samples instead of stopping at the first one")
    s = p.add_argument_group("solver options (method defaults when omitted)")
    s.add_argument("--alpha", type=float, default=None, help="GPTAQ asymmetric-term scale (gptaq/vlmptq default 0.25; 1, the derived value, "
                        "lost to 0.25 on real weights with 8k-33k calibration tokens: docs/quality.md)")
    s.add_argument("--correction", choices=["none", "diag", "exact", "target"], default=None,
                   help="VLM-PTQ rounding-target correction: diag (paper, default), exact (all remaining columns), "
                        "target (GPTQ on the least-squares target; best at W2 on real weights with the default "
                        "alpha), none")
    s.add_argument("--no-modality", action="store_true", help="VLM-PTQ without modality-aware group parameters")
    s.add_argument("--mu-grid", type=float, nargs="+", default=None,
                   help="VLM-PTQ vision/text fusion weights searched per layer (default 0 .2 .4 .5 .6 .8 1)")
    s.add_argument("--modality-norm", choices=["mean", "sum"], default=None,
                   help="per-modality Hessian diagonals as per-token means (default) or raw sums")
    s.add_argument("--act-order", action="store_true", help="quantize columns by descending Hessian diagonal")
    s.add_argument("--no-clip-search", action="store_true", help="min-max group ranges instead of an MSE clip search")
    s.add_argument("--damp", type=float, default=0.01, help="Hessian dampening as a fraction of its mean diagonal")
    s.add_argument("--block-size", type=int, default=128, help="columns per lazy-update block")
    r = p.add_argument_group("run")
    r.add_argument("--ignore", nargs="+", default=[], metavar="REGEX",
                   help="decoder-layer linears to keep in 16-bit (regex on the module name); the vision tower and "
                        "projector are always kept, the lm_head unless --lm-head-bits; q/k/v_proj and gate/up_proj "
                        "all or none, and a MoE block's experts (vLLM fuses them); a REGEX that matches no decoder "
                        "linear is an error")
    r.add_argument("--device", default="auto", help="compute device: auto, cpu, cuda, cuda:N")
    r.add_argument("--lazy-load", action=argparse.BooleanOptionalAction, default=None,
                   help="read the decoder layers from the model's files one at a time instead of loading the whole "
                        "model: host memory holds the rest of the model, one layer and the finished layers' packed "
                        "codes (--dry-run prints how much); the checkpoint is the same. Default: only when the "
                        "weights would not fit in the available host memory")
    r.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="model dtype")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    r.add_argument("--dry-run", action="store_true",
                   help="print which linears get which scheme and the checkpoint's size, from the config alone "
                        "(no weights or calibration data are read), and stop")
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted run with the same settings: the decoder layers it finished are "
                        "kept in OUT.vlmptq-progress/ (removed once the checkpoint is written) and not solved again")


def _quantize(args: argparse.Namespace) -> int:
    import vlmptq
    from vlmptq.calib import CalibConfig
    from vlmptq.config import SchemeOverride, make_config

    overrides = tuple(SchemeOverride.parse(spec) for spec in args.override)
    solver = {k: v for k, v in dict(
        alpha=args.alpha, correction=args.correction, mu_grid=tuple(args.mu_grid) if args.mu_grid else None,
        modality=False if args.no_modality else None, modality_norm=args.modality_norm,
    ).items() if v is not None}
    if args.act_order:
        solver["act_order"] = True
    if args.no_clip_search:
        solver["clip_search"] = False
    if args.damp != 0.01:
        solver["damp"] = args.damp
    if args.block_size != 128:
        solver["block_size"] = args.block_size
    calib = CalibConfig(
        source=args.calib, num_samples=args.num_samples, max_seq_len=args.max_seq_len, seed=args.seed,
        split=args.split, image_column=args.image_column, text_column=args.text_column,
        prompt_column=args.prompt_column, max_image_side=args.max_image_side, image_root=args.image_root,
        video_frames=args.video_frames, video_fps=args.video_fps,
        on_bad_sample="skip" if args.skip_bad_samples else "error",
    )
    config = make_config(
        method=args.method, group_size=args.group_size, symmetric=args.sym,
        **({"bits": args.bits} if "bits" in args else {}),
        **({"target_bits": args.target_bits} if args.target_bits is not None else {}),
        **({"bits_choices": tuple(args.bits_choices)} if "bits_choices" in args else {}),
        lm_head_bits=args.lm_head_bits, lm_head_group_size=args.lm_head_group_size,
        solver=solver, calib=calib, ignore=tuple(args.ignore), overrides=overrides, device=args.device,
        dtype=args.dtype, overwrite=args.overwrite, resume=args.resume, lazy_load=args.lazy_load,
    )
    if args.dry_run:
        from vlmptq.plan import plan

        print(plan(args.model, config).format())
        return 0
    report = vlmptq.quantize(args.model, args.out, config)
    logging.getLogger("vlmptq").info("%s", report)
    print(report.checkpoint)
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from vlmptq.calib import BUILTIN_HOLDOUT

    p = sub.add_parser(
        "compare", help="measure how far quantized checkpoints' predictions are from the source model's",
        description="Run the source model and each checkpoint (dequantized, in its dtype) on the same image+text "
                    "prompts and report the mean KL divergence of their next-token distributions (nats per token) "
                    "and how often their top-1 tokens agree, at the text positions after the image. The model is "
                    "loaded once and run one decoder layer at a time, each checkpoint's weights swapped in. Prompts: "
                    "held-out photos never in the built-in calibration set, or your own pairs (--data); a text-only "
                    "model is compared on --data's text, at every position.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="quantized checkpoints of --model (directories or Hub ids)")
    p.add_argument("--model", required=True, help="the source model they were quantized from (directory or Hub id)")
    p.add_argument("--photos", type=int, default=len(BUILTIN_HOLDOUT),
                   help=f"held-out photos to ask about (1-{len(BUILTIN_HOLDOUT)})")
    p.add_argument("--questions", type=int, default=2, help="questions per photo (1-4)")
    p.add_argument("--data", default=None,
                   help="your own image-text pairs instead, in any --calib format of `vlmptq quantize` (best: pairs "
                        "the checkpoints were not calibrated on); for a text-only model, text in any of its --calib "
                        "formats (required)")
    p.add_argument("--num-samples", type=int, default=16, help="pairs (text-only models: windows) taken from --data")
    p.add_argument("--image-root", default=None, help="folder that relative image paths in --data start from")
    p.add_argument("--text-column", default="text", help="the key / column of --data holding the caption or text")
    p.add_argument("--max-seq-len", type=int, default=4096,
                   help="longest prompt (tokens) taken from --data (text-only models: the window length)")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="skip (and count) unreadable or too-long pairs of --data instead of stopping at the first one")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (it holds one decoder layer at a time)")
    p.add_argument("--lazy-load", action=argparse.BooleanOptionalAction, default=None,
                   help="read the source model's decoder layers from its files one at a time instead of loading "
                        "the whole model (the figures are the same). Default: only when the weights would not fit "
                        "in the available host memory")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="model dtype (auto: the first checkpoint's)")
    p.add_argument("--per-layer", action="store_true",
                   help="also print, per decoder layer, each checkpoint's relative hidden-state error after it "
                        "(where the error enters: a guide for --override)")


def _compare(args: argparse.Namespace) -> int:
    import torch

    from vlmptq.calib import CalibConfig
    from vlmptq.compare import compare, format_drift, format_rows

    data = (CalibConfig(source=args.data, num_samples=args.num_samples, image_root=args.image_root,
                        max_seq_len=args.max_seq_len, text_column=args.text_column,
                        on_bad_sample="skip" if args.skip_bad_samples else "error") if args.data else None)
    rows = compare(args.model, args.checkpoints, data=data, photos=args.photos, questions=args.questions,
                   device=args.device, dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
                   lazy_load=args.lazy_load)
    print(format_rows(rows))
    if args.per_layer:
        print("\nRelative hidden-state error after each decoder layer (||h_q - h|| / ||h||, compared positions):\n")
        print(format_drift(rows))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from vlmptq.checkpoint.reader import inspect_checkpoint

    from vlmptq.models.source import resolve_model

    print(inspect_checkpoint(resolve_model(args.dir, role="checkpoint")).format())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmptq", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--version", action="version", version=f"vlmptq {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    p = sub.add_parser("inspect", help="print a checkpoint's scheme, layers, sizes and compression",
                       description="Print a vlmptq / compressed-tensors checkpoint's scheme, quantized and "
                                   "16-bit layers, sizes, bits per weight and compression ratio.")
    p.add_argument("dir", help="checkpoint directory or Hugging Face Hub id")
    _add_compare(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a pre-empted job, ``kill``, Kubernetes' shutdown) as an interruption, so the run unwinds
    like a Ctrl-C: no half-written output, the finished layers kept for ``--resume``, a message."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from vlmptq.errors import VlmptqError

    try:
        with _terminate_as_interrupt():
            return {"quantize": _quantize, "inspect": _inspect, "compare": _compare}[args.command](args)
    except VlmptqError as e:
        print(f"vlmptq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"vlmptq: {what}" + ("; nothing was written to --out" if args.command == "quantize" else ""),
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


def _version() -> str:
    from vlmptq import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
