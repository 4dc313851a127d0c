"""``python -m vlmptq.demo`` (``make demo``): quantize the built-in demo VLM, measure it, serve it,
ask it about a photo.

1. Build the demo model once (cached under ``.cache/vlmptq``): the VLM proxy of
   ``vlmptq.proxy`` (the real SmolLM2-135M-Instruct, dequantized from its GGUF, inside a LLaVA
   architecture with an untrained vision tower).
2. Quantize it with VLM-PTQ at W4 g64 on the built-in calibration set -> ``demo-out/``.
3. Print its quality row: KL of the quantized checkpoint's next-token distributions from the
   unquantized model on prompts built from held-out photos.
4. Serve the checkpoint with ``vllm serve --quantization vlmptq`` on 127.0.0.1 (free port), ask it
   about a held-out photo through the OpenAI-compatible API, print the answer, shut the server down.
Everything runs offline. The proxy's vision tower is untrained: its answer is fluent but not
grounded in the photo (see vlmptq/proxy.py for what the proxy is and is not).
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("vlmptq.demo")

QUESTION = "What is in this picture? Answer in one sentence."


def parse_args(argv=None) -> argparse.Namespace:
    from vlmptq.calib import BUILTIN_HOLDOUT
    from vlmptq.quant.scheme import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
    from vlmptq.solvers import SOLVERS

    p = argparse.ArgumentParser(prog="python -m vlmptq.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local Hugging Face VLM directory to use instead of the built-in proxy")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="where the quantized checkpoint goes")
    p.add_argument("--method", default="vlmptq", choices=sorted(SOLVERS), help="quantization algorithm")
    p.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS,
                   help="weight bits (on the CPU the plugin serves 2/3-bit checkpoints with 4-bit codes in memory)")
    p.add_argument("--group-size", type=int, default=64, choices=SUPPORTED_GROUP_SIZES,
                   help="columns per scale / zero point")
    p.add_argument("--num-samples", type=int, default=16, help="built-in calibration samples")
    p.add_argument("--kl-photos", type=int, default=3, choices=range(1, len(BUILTIN_HOLDOUT) + 1),
                   metavar=f"1..{len(BUILTIN_HOLDOUT)}", help="held-out photos for the KL row")
    p.add_argument("--photo", default="chelsea", choices=BUILTIN_HOLDOUT, help="held-out photo to ask about")
    p.add_argument("--max-tokens", type=int, default=48, help="answer length limit")
    p.add_argument("--no-serve", action="store_true", help="stop after the quality row")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                   help="torch threads (1 is fastest on a busy 2-core machine)")
    return p.parse_args(argv)


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def quality_row(model_dir: Path, checkpoint: Path, n_photos: int, label: str, method: str, scheme: str) -> str:
    from vlmptq.compare import compare

    (row,) = compare(model_dir, [checkpoint], photos=n_photos, questions=1, device="cpu", dtype=torch.float32)
    return (f"| model | method | scheme | KL vs unquantized (nats/token) | top-1 agreement |\n|---|---|---|---|---|\n"
            f"| {label} | {method} | {scheme} | {row.kl:.4f} over {row.positions} text positions, "
            f"{row.prompts} prompts on held-out photos | {100 * row.top1:.1f}% |")


def ask(base_url: str, photo: str, max_tokens: int) -> str:
    from openai import OpenAI

    from vlmptq.demo.evaluate import holdout_photo

    buf = io.BytesIO()
    holdout_photo(photo).save(buf, format="JPEG", quality=90)
    data_url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    client = OpenAI(base_url=base_url, api_key="unused")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0.0,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": QUESTION}]}],
    )
    return reply.choices[0].message.content


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("vlmptq.pipeline").setLevel(logging.WARNING)  # one line per linear: too much here
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    from vlmptq import quantize
    from vlmptq.calib import CalibConfig
    from vlmptq.config import make_config

    if args.model:
        model_dir, label = Path(args.model), Path(args.model).name
    else:
        from vlmptq.proxy import proxy_dir

        step("1/4 demo model: the VLM proxy around the real SmolLM2-135M-Instruct (built once, cached)")
        model_dir, label = proxy_dir("smollm2-135m", dtype=torch.bfloat16), "smollm2-135m-vlm-proxy"
    print(model_dir)

    step(f"2/4 quantize: {args.method} W{args.bits} g{args.group_size}, {args.num_samples} built-in "
         "calibration samples")
    out = args.out.absolute() / f"{label}-w{args.bits}g{args.group_size}-{args.method}"
    config = make_config(method=args.method, bits=args.bits, group_size=args.group_size, device="cpu",
                         calib=CalibConfig(source="builtin", num_samples=args.num_samples), overwrite=True)
    report = quantize(model_dir, out, config)
    print(report)

    step("3/4 quality: KL of the quantized checkpoint from the unquantized model (held-out photos)")
    print(quality_row(model_dir, out, args.kl_photos, label, args.method, f"W{args.bits} g{args.group_size}"))

    if not args.no_serve:
        from vlmptq.server import CPU_SERVER_ARGS, VllmServer

        step("4/4 serve with vLLM (--quantization vlmptq) and ask about a held-out photo")
        with VllmServer(out, [*CPU_SERVER_ARGS, "--quantization", "vlmptq"]) as server:
            base_url = server.base_url + "/v1"
            print(f"server healthy at {base_url}")
            answer = ask(base_url, args.photo, args.max_tokens)
            print(f"Q ({args.photo} photo): {QUESTION}\nA: {answer}")
            if not args.model:
                print("(The proxy's vision tower is untrained, so the answer is fluent text from the real "
                      "language model, not a description grounded in the photo.)")
        print("server stopped")
    print(f"\ndone in {time.perf_counter() - t_start:.0f}s; checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
