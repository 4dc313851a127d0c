#!/usr/bin/env python3
"""Quality on real weights: RTN vs GPTQ vs GPTAQ vs VLM-PTQ (diagonal C) vs VLM-PTQ (exact shift).

Two measurements per real model that installs offline (SmolLM2-135M-Instruct, Gemma-3-270M):
  ppl  perplexity of the language model on held-out Wikipedia text (gensim's excerpt; calibration
       on a disjoint set of articles), text-only calibration;
  kl   the VLM proxy around the same language model (vlmptq/proxy.py: real LM, untrained vision
       tower): mean KL(unquantized || quantized) of next-token distributions on image+text prompts
       from held-out photos (vlmptq.calib.BUILTIN_HOLDOUT), calibrated on vlmptq's built-in set
       through the public API (vlmptq.quantize_in_memory).
The baseline is the dequantized GGUF model in fp32 (the packaged weights are already 4-bit).
Each quantization runs in a fresh process (honest peak RSS); finished runs are kept in --work-dir,
so an interrupted run resumes. Writes benchmarks/results/quality.{md,json}.

    OMP_NUM_THREADS=1 python benchmarks/quality.py            # full run (hours on 2 CPU cores)
    python benchmarks/quality.py --quick --tiny --out /tmp/q   # smoke run on a tiny random model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import git_commit, result_header, write_results  # noqa: E402
from quality_report import render_markdown  # noqa: E402

logger = logging.getLogger("quality")

METHODS = ("rtn", "gptq", "gptaq", "vlmptq", "vlmptq-exact")
# --extra: beyond the paper (least-squares target) and the modality-normalisation ablation. With
# text-only calibration there are no vision tokens and "sum" equals "mean" up to a scale, so
# vlmptq-sum only runs on the proxies.
EXTRA_METHODS = ("vlmptq-target", "vlmptq-target-a025", "vlmptq-sum")
KL_ONLY = {"vlmptq-sum"}
# method name -> (solver, SolverOptions fields). Every method keeps the defaults (MSE clip search,
# act-order off, damp 0.01, alpha 0.25); only the correction differs between the VLM-PTQ rows.
SOLVER_FOR = {
    "rtn": ("rtn", {}),
    "gptq": ("gptq", {}),
    "gptaq": ("gptaq", {}),
    "vlmptq": ("vlmptq", {}),
    "vlmptq-exact": ("vlmptq", {"correction": "exact"}),
    "vlmptq-target": ("vlmptq", {"correction": "target", "alpha": 1.0}),
    "vlmptq-target-a025": ("vlmptq", {"correction": "target"}),
    "vlmptq-sum": ("vlmptq", {"modality_norm": "sum"}),
    # the paper's ablation (--methods only): the correction C alone (GPTAQ's group parameters), and
    # the modality-aware static group parameters with the searched mu alone (no correction)
    "vlmptq-c-only": ("vlmptq", {"modality": False}),
    "vlmptq-m-only": ("vlmptq", {"correction": "none"}),
}
BASELINE = "baseline"


@dataclass(frozen=True)
class Sizes:
    calib_seqs: int = 32  # text calibration windows
    calib_len: int = 256  # tokens per calibration window
    eval_seqs: int = 16  # held-out windows
    eval_len: int = 512  # tokens per held-out window
    proxy_calib: int = 32  # built-in image-text calibration samples for the proxy
    kl_photos: int = 6  # held-out photos for the proxy KL (of BUILTIN_HOLDOUT)
    kl_questions: int = 4  # questions per photo
    calib_seed: int = 0  # which text windows / built-in samples calibrate (0: the committed tables')


QUICK = Sizes(calib_seqs=4, calib_len=64, eval_seqs=2, eval_len=128, proxy_calib=2, kl_photos=1, kl_questions=1)


@dataclass(frozen=True)
class Run:
    """One cell of the table (or a baseline)."""

    model: str  # real model key (vlmptq.proxy.REAL_MODELS) or "tiny"
    task: str  # "ppl" or "kl"
    method: str
    bits: int | None
    group_size: int | None
    sizes: Sizes = field(default_factory=Sizes)
    lm_head_bits: int | None = None  # also quantize the lm_head (group size as the layers')
    overrides: tuple[str, ...] = ()  # mixed precision: vlmptq --override specs (REGEX=BITS[:GROUP])
    target_bits: float | None = None  # automatic mixed precision (vlmptq --target-bits; bits: the column)

    def key(self) -> str:
        d = asdict(self)
        if not d["sizes"]["calib_seed"]:
            del d["sizes"]["calib_seed"]  # keys of the runs made before the seed existed stay valid
        if d["lm_head_bits"] is None:
            del d["lm_head_bits"]  # same for the lm_head option
        if not d["overrides"]:
            del d["overrides"]  # and for the overrides
        if d["target_bits"] is None:
            del d["target_bits"]  # and the target
        blob = json.dumps(d, sort_keys=True)
        head = f"-head{self.lm_head_bits}" if self.lm_head_bits else ""
        mixed = ("-mixed" if self.overrides else "") + (f"-auto{self.target_bits:g}" if self.target_bits else "")
        tag = f"{self.model}-{self.task}-{self.method}-w{self.bits}g{self.group_size}{head}{mixed}"
        return f"{tag}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


# ----------------------------------------------------------------------------- models and data
def model_dirs(model: str, task: str, work: Path) -> tuple[Path, Path | None]:
    """(language model dir, VLM proxy dir or None for ppl) in fp32, built once."""
    import torch

    from vlmptq import proxy

    if model == "tiny":
        return proxy.tiny_lm_dir(work / "tiny-lm"), (proxy.tiny_proxy_dir(work / "tiny-proxy") if task == "kl" else None)
    lm = proxy.real_lm_dir(model, dtype=torch.float32)
    return lm, (proxy.proxy_dir(model, dtype=torch.float32) if task == "kl" else None)


def text_data(model: str, lm_dir: Path, sizes: Sizes, work: Path):
    """(calibration windows, held-out windows) as token tensors, cached in ``work``."""
    import torch
    from transformers import AutoTokenizer

    from quality_data import calibration_windows, eval_windows
    from vlmptq.proxy import REAL_MODELS

    seed = f"-seed{sizes.calib_seed}" if sizes.calib_seed else ""
    path = work / f"text-{model}-{sizes.calib_seqs}x{sizes.calib_len}-{sizes.eval_seqs}x{sizes.eval_len}{seed}.pt"
    if path.is_file():
        return torch.load(path)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    bos = tok.bos_token_id if model in REAL_MODELS and REAL_MODELS[model].add_bos else None
    data = (calibration_windows(tok, sizes.calib_seqs, sizes.calib_len, seed=sizes.calib_seed, bos=bos),
            eval_windows(tok, sizes.eval_seqs, sizes.eval_len, bos=bos))
    torch.save(data, path)
    return data


@dataclass
class TextSample:
    """A text-only calibration sample: every token is a text token."""

    inputs: dict
    vision_mask: object
    text_mask: object
    sample_id: str


def text_samples(windows) -> list[TextSample]:
    import torch

    t = windows.shape[1]
    return [TextSample({"input_ids": w[None]}, torch.zeros(t, dtype=torch.bool), torch.ones(t, dtype=torch.bool),
                       f"wiki[{i}]") for i, w in enumerate(windows)]


def perplexity(model, windows, chunk: int = 128) -> float:
    """exp(mean next-token NLL) over all windows; the vocabulary projection runs in chunks."""
    import torch
    import torch.nn.functional as F

    softcap = getattr(model.config, "final_logit_softcapping", None)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            hidden = model.model(input_ids=w[None], use_cache=False).last_hidden_state[0, :-1]
            for c in range(0, hidden.shape[0], chunk):
                logits = model.lm_head(hidden[c:c + chunk]).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                nll += F.cross_entropy(logits, w[1 + c:1 + c + chunk], reduction="sum").item()
            count += w.numel() - 1
    return float(torch.tensor(nll / count).exp())


# ----------------------------------------------------------------------------- one run
class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _solver_options(method: str):
    from vlmptq.solvers import SolverOptions

    name, fields = SOLVER_FOR[method]
    return name, SolverOptions(**fields)


def _overrides(run: Run):
    from vlmptq.config import SchemeOverride

    return tuple(SchemeOverride.parse(o) for o in run.overrides)


def _scheme_config(run: Run, **fields):
    """The run's QuantizeConfig (its bits, or its target bits and their allocation)."""
    from vlmptq.config import make_config

    bits = {"target_bits": run.target_bits} if run.target_bits else {"bits": run.bits}
    return make_config(**bits, group_size=run.group_size, overrides=_overrides(run), **fields)


def _scheme_for(run: Run, model, adapter, samples):
    """The run's per-linear scheme resolver (None: one scheme for all); a target's allocation is measured
    on ``samples`` (vlmptq.allocation.choose_bits, as vlmptq.quantize does)."""
    if not run.overrides and not run.target_bits:
        return None
    config = _scheme_config(run, device="cpu")
    if not run.target_bits:
        return config.scheme_resolver()
    from vlmptq.allocation import choose_bits

    return config.scheme_resolver(choose_bits(model, adapter, samples, config))


def _kl_setup(run: Run, proxy: Path):
    from transformers import AutoConfig

    from vlmptq.calib import BUILTIN_HOLDOUT
    from vlmptq.demo.evaluate import EVAL_QUESTIONS, kl_samples
    from vlmptq.models.adapters import adapter_for_type, load_processor, read_model_type

    ids = adapter_for_type(read_model_type(proxy)).vision_token_ids_of(AutoConfig.from_pretrained(proxy))
    processor = load_processor(proxy)
    s = run.sizes
    return kl_samples(processor, ids, BUILTIN_HOLDOUT[:s.kl_photos], EVAL_QUESTIONS[:s.kl_questions])


def execute(run: Run, work: Path, isolated: bool) -> dict:
    """Quantize (unless baseline) and evaluate; returns the result record."""
    import torch

    from vlmptq.models.adapters import load_model

    lm_dir, proxy = model_dirs(run.model, run.task, work)
    t0 = time.perf_counter()
    seconds = None
    peak = None
    if run.task == "ppl":
        calib, evals = text_data(run.model, lm_dir, run.sizes, work)
        model, adapter = load_model(lm_dir, torch.float32)
        if run.method != BASELINE:
            from vlmptq.pipeline.sequential import quantize_model
            from vlmptq.quant.scheme import WeightScheme
            from vlmptq.solvers import build_solver

            name, opts = _solver_options(run.method)
            head = WeightScheme(run.lm_head_bits, run.group_size, False) if run.lm_head_bits else None
            samples = text_samples(calib)
            with PeakRSS() as mem:
                res = quantize_model(model, adapter, build_solver(name, opts),
                                     WeightScheme(run.bits, run.group_size, False), samples, device="cpu",
                                     head_scheme=head, scheme_for=_scheme_for(run, model, adapter, samples))
            seconds, peak = res.seconds, mem.peak
        value = perplexity(model, evals)
    else:
        from vlmptq.demo.evaluate import mean_kl, reference_logprobs

        samples = _kl_setup(run, proxy)
        baseline = Run(run.model, 'kl', BASELINE, None, None, replace(run.sizes, calib_seed=0))
        ref_path = work / f"kl-ref-{baseline.key()}.pt"
        if run.method == BASELINE:
            model, _ = load_model(proxy, torch.float32)
            ref = reference_logprobs(model, samples)
            torch.save(ref, ref_path)
            value = 0.0
        else:
            from vlmptq import quantize_in_memory
            from vlmptq.calib import CalibConfig

            name, opts = _solver_options(run.method)
            config = _scheme_config(run, method=name, solver=opts, lm_head_bits=run.lm_head_bits,
                                    calib=CalibConfig(source="builtin", num_samples=run.sizes.proxy_calib,
                                                      seed=run.sizes.calib_seed),
                                    device="cpu", dtype="float32")
            with PeakRSS() as mem:
                model, res, _n = quantize_in_memory(proxy, config)
            seconds, peak = res.seconds, mem.peak
            value = mean_kl(model, samples, torch.load(ref_path))
    if isolated and peak is not None:
        peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    rec = {
        "model": model_label(run), "method": run.method, "bits": run.bits, "group_size": run.group_size,
        **({"lm_head_bits": run.lm_head_bits} if run.lm_head_bits else {}),
        **({"overrides": list(run.overrides)} if run.overrides else {}),
        **({"target_bits": run.target_bits} if run.target_bits else {}),
        **({"code_bits": res.code_bits()} if run.overrides or run.target_bits else {}),
        "metric": run.task, "value": value, "quant_seconds": seconds,
        "peak_rss_mb": None if peak is None else round(peak / 2**20, 1),
        "wall_seconds": round(time.perf_counter() - t0, 1), "run": run.key(), "commit": git_commit(),
    }
    if run.method != BASELINE and run.method != "rtn":
        mus = [r.info["mu"] for r in res.records if "mu" in r.info]
        if mus:
            rec["mu_mean"] = sum(mus) / len(mus)
    return rec


def model_label(run: Run) -> str:
    return f"{run.model}-vlm-proxy" if run.task == "kl" else run.model


# ----------------------------------------------------------------------------- orchestration
def plan(models, tasks, bits, group_size, methods, sizes, lm_head_bits=None, overrides=(), target_bits=None
         ) -> list[Run]:
    # the calibration seed draws the text windows (ppl) and the built-in image-text samples (kl): only
    # quantized runs read them, so the baselines keep seed 0's runs and cache keys
    unseeded = replace(sizes, calib_seed=0)
    runs = []
    for model in models:
        for task in tasks:
            runs.append(Run(model, task, BASELINE, None, None, unseeded))
            runs += [Run(model, task, m, b, group_size, sizes, lm_head_bits, tuple(overrides), target_bits)
                     for b in bits
                     for m in methods if task == "kl" or m not in KL_ONLY]
    return runs


def run_all(runs: list[Run], work: Path, isolate: bool, threads: int) -> tuple[list[dict], int]:
    """Every run's record, and how many of them were reused from an earlier invocation."""
    done_dir = work / "runs"
    done_dir.mkdir(parents=True, exist_ok=True)
    records, reused = [], 0
    for i, run in enumerate(runs):
        path = done_dir / f"{run.key()}.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
            reused += 1
            continue
        logger.info("[%d/%d] %s", i + 1, len(runs), run.key())
        if isolate:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            cmd = [sys.executable, __file__, "--worker", json.dumps(asdict(run)), "--work-dir", str(work),
                   "--threads", str(threads)]
            subprocess.run(cmd, check=True, env=env)
        else:
            path.write_text(json.dumps(execute(run, work, isolated=False), indent=1) + "\n")
        rec = json.loads(path.read_text())
        logger.info("%s %s W%s: %s = %.4g (%.0fs quantizing, peak RSS %s MB)", rec["model"], rec["method"],
                    rec["bits"], rec["metric"], rec["value"], rec["quant_seconds"] or 0, rec["peak_rss_mb"])
        records.append(rec)
    return records, reused


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"],
                   help="real models (vlmptq.proxy.REAL_MODELS keys)")
    p.add_argument("--tasks", nargs="+", default=["ppl", "kl"], choices=["ppl", "kl"],
                   help="ppl: text perplexity of the LM; kl: KL on the VLM proxy")
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2], help="weight bit widths")
    p.add_argument("--group-size", type=int, default=64,
                   help="group size (64: GGUF Q4 blocks of 32 would make 4-bit g32 trivially exact)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(SOLVER_FOR), help="methods")
    p.add_argument("--extra", action="store_true",
                   help="also run vlmptq-target (least-squares target, alpha 1; beyond the paper), the same at "
                        "alpha 0.25 (vlmptq-target-a025) and, on the "
                        "proxies, vlmptq-sum (raw-sum modality diagonals)")
    p.add_argument("--lm-head-bits", type=int, default=None, choices=[2, 3, 4, 8],
                   help="also quantize the lm_head (same method and group size; tied embeddings stay 16-bit)")
    p.add_argument("--target-bits", type=float, default=None, metavar="BITS",
                   help="automatic mixed precision, as vlmptq quantize --target-bits (choices 2/3/4; the run is "
                        "listed in the --bits column; records get the average code bits)")
    p.add_argument("--override", nargs="+", default=[], metavar="REGEX=BITS[:GROUP]",
                   help="mixed precision, as vlmptq quantize --override (records get the average code bits)")
    p.add_argument("--calib-seqs", type=int, default=Sizes.calib_seqs, help="text calibration windows")
    p.add_argument("--calib-len", type=int, default=Sizes.calib_len, help="tokens per calibration window")
    p.add_argument("--calib-seed", type=int, default=Sizes.calib_seed,
                   help="draw other calibration data (text windows for ppl, built-in samples for kl; "
                        "0: the committed tables') to see the draw-to-draw spread")
    p.add_argument("--eval-seqs", type=int, default=Sizes.eval_seqs, help="held-out text windows")
    p.add_argument("--eval-len", type=int, default=Sizes.eval_len, help="tokens per held-out window")
    p.add_argument("--proxy-calib", type=int, default=Sizes.proxy_calib, help="built-in calibration samples (proxy)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, in-process: a smoke run of minutes")
    p.add_argument("--tiny", action="store_true", help="a tiny random llama LM and LLaVA proxy instead of real models")
    p.add_argument("--no-isolate", action="store_true", help="run everything in this process (RSS not isolated)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                   help="torch threads per run (1 avoids OpenMP thrashing on a shared 2-core machine)")
    p.add_argument("--work-dir", type=Path, default=Path(".cache/vlmptq/quality"), help="finished runs, data")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "quality",
                   help="output stem: writes <out>.md and <out>.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("vlmptq").setLevel(logging.WARNING)  # one line per linear is too much here
    import torch

    torch.set_num_threads(args.threads)
    work = args.work_dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        d = json.loads(args.worker)
        run = Run(**{**d, "sizes": Sizes(**d["sizes"]), "overrides": tuple(d.get("overrides", ()))})
        rec = execute(run, work, isolated=True)
        (work / "runs" / f"{run.key()}.json").write_text(json.dumps(rec, indent=1) + "\n")
        return
    sizes = QUICK if args.quick else Sizes(args.calib_seqs, args.calib_len, args.eval_seqs, args.eval_len,
                                           args.proxy_calib, calib_seed=args.calib_seed)
    models = ["tiny"] if args.tiny else args.models
    methods = list(args.methods) + ([m for m in EXTRA_METHODS if m not in args.methods] if args.extra else [])
    runs = plan(models, args.tasks, args.bits, args.group_size, methods, sizes, args.lm_head_bits, args.override,
                args.target_bits)
    t0 = time.perf_counter()
    records, reused = run_all(runs, work, isolate=not (args.quick or args.no_isolate), threads=args.threads)
    header = {**result_header(), "threads": args.threads, "sizes": asdict(sizes),
              "runs": f"{len(runs) - reused} run now ({time.perf_counter() - t0:.0f} s), {reused} reused "
                      f"from {os.path.relpath(work / 'runs')} (each record has its own time and, since 2026-11-27, commit)"}
    write_results(args.out, header, records, render_markdown(records, header))


if __name__ == "__main__":
    main()
