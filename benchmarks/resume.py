"""What an interruption costs with ``--resume``: one full ``vlmptq quantize`` run, then the same run
stopped by SIGTERM (a pre-empted job) once ``--stop-after`` decoder layers are stored, then
``--resume``; each a fresh CLI process. Checks the resumed checkpoint is identical to the full run's
(every tensor and the quantization_config) and writes ``benchmarks/results/resume-<date>.{md,json}``.

    OMP_NUM_THREADS=1 python benchmarks/resume.py        # SmolLM2-135M VLM proxy (real weights), ~3 min
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cli_runs import add_run_args, model_dir  # noqa: E402
from _results import result_header, write_results  # noqa: E402

logger = logging.getLogger("resume")


def _cli(args: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "vlmptq", "-q", "quantize", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, what: str, ok: tuple[int, ...] = (0,)) -> int:
    _, err = proc.communicate()
    if proc.returncode not in ok:
        raise RuntimeError(f"{what} exited with {proc.returncode}:\n{err[-3000:]}")
    return proc.returncode


def _tensors(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, "resume", num_samples=16)
    p.add_argument("--method", default="vlmptq")
    p.add_argument("--stop-after", type=int, default=20, help="SIGTERM once this many decoder layers are stored")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.model = model_dir(args)
    work = args.work_dir.absolute()
    full, stopped = work / "full", work / "stopped"
    store = stopped.parent / f"{stopped.name}.vlmptq-progress"
    for d in (full, stopped, store):
        shutil.rmtree(d, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--model", str(args.model), "--method", args.method, "--bits", str(args.bits), "--group-size",
              str(args.group_size), "--num-samples", str(args.num_samples), "--device", "cpu"]

    t0 = time.perf_counter()
    _finish(_cli([*common, "--out", str(full)], args.threads), "the full run")
    t_full = time.perf_counter() - t0
    logger.info("full run: %.1f s", t_full)

    t0 = time.perf_counter()
    proc = _cli([*common, "--out", str(stopped)], args.threads)
    while len(list(store.glob("layer-*.safetensors"))) < args.stop_after:
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (exit {proc.returncode}) before {args.stop_after} layers were stored")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    rc = _finish(proc, "the stopped run", ok=(143,))
    t_stopped = time.perf_counter() - t0
    stored = len(list(store.glob("layer-*.safetensors")))
    store_mb = sum(f.stat().st_size for f in store.iterdir()) / 2**20
    logger.info("stopped: exit %d after %.1f s, %d layers stored (%.1f MiB)", rc, t_stopped, stored, store_mb)

    t0 = time.perf_counter()
    _finish(_cli([*common, "--out", str(stopped), "--resume"], args.threads), "the resumed run")
    t_resumed = time.perf_counter() - t0
    a, b = _tensors(full), _tensors(stopped)
    identical = sorted(a) == sorted(b) and all(bool((a[k] == b[k]).all()) for k in a)
    qc = [json.loads((d / "config.json").read_text())["quantization_config"] for d in (full, stopped)]
    n_layers = json.loads((args.model / "config.json").read_text()).get("text_config", {}).get("num_hidden_layers")
    records = [
        {"run": "full", "seconds": round(t_full, 1)},
        {"run": "stopped by SIGTERM", "seconds": round(t_stopped, 1), "exit_code": rc, "layers_stored": stored,
         "store_mib": round(store_mb, 1)},
        {"run": "resumed", "seconds": round(t_resumed, 1), "store_left": store.exists(),
         "tensors": len(a), "identical_tensors": identical, "identical_quantization_config": qc[0] == qc[1]},
    ]
    header = {**result_header(), "model": str(args.model), "decoder_layers": n_layers, "threads": args.threads,
              "scheme": f"{args.method} W{args.bits} g{args.group_size}, {args.num_samples} calibration samples"}
    md = ["# Resuming an interrupted quantization", "", "| run | seconds | |", "|---|---|---|",
          f"| full | {t_full:.1f} | |",
          f"| stopped by SIGTERM | {t_stopped:.1f} | exit {rc}, {stored} decoder layers stored ({store_mb:.1f} MiB) |",
          f"| `--resume` | {t_resumed:.1f} | {len(a)} tensors {'identical' if identical else 'DIFFERENT'} to the full "
          f"run's, quantization_config {'identical' if qc[0] == qc[1] else 'DIFFERENT'}; store "
          f"{'left behind' if store.exists() else 'removed'} |", ""]
    write_results(args.out, header, records, "\n".join(md))
    if not identical or qc[0] != qc[1]:
        raise SystemExit("the resumed checkpoint differs from the full run's")


if __name__ == "__main__":
    main()
