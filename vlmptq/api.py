"""The public verb: ``vlmptq.quantize(model_dir, out_dir, config)``."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmptq.calib.encode import CalibSample
from vlmptq.calib.text import check_text_source, load_text_calibration
from vlmptq.checkpoint.lock import output_lock
from vlmptq.checkpoint.writer import CheckpointSummary, check_destination, save_quantized_checkpoint
from vlmptq.config import QuantizeConfig, as_config
from vlmptq.errors import ConfigError
from vlmptq.models.adapters import (
    ModelAdapter, load_model, load_model_lazily, load_processor, load_skeleton, read_checkpoint_dtype,
)
from vlmptq.models.lazy import choose_lazy_load
from vlmptq.models.source import model_dir_of
from vlmptq.pipeline.progress import LayerProgress, model_files_digest, progress_dir_for
from vlmptq.plan import check_fits
from vlmptq.pipeline.sequential import LinearRecord, PipelineResult, quantize_model
from vlmptq.quant.scheme import WeightScheme
from vlmptq.solvers import build_solver

logger = logging.getLogger(__name__)


@dataclass
class QuantizeReport:
    """What :func:`quantize` did: the checkpoint written and one record per quantized linear."""

    checkpoint: CheckpointSummary
    records: list[LinearRecord]
    num_calibration_samples: int
    seconds: float
    peak_memory_bytes: int | None

    def __str__(self) -> str:
        peak = f", peak GPU memory {self.peak_memory_bytes / 2**30:.2f} GiB" if self.peak_memory_bytes else ""
        return (f"{self.checkpoint}\nquantized {len(self.records)} linears in {self.seconds:.1f}s "
                f"with {self.num_calibration_samples} calibration samples{peak}")


def quantize_in_memory(model: str | Path, config: QuantizeConfig | Mapping | None = None, *,
                       progress: LayerProgress | None = None, keep_model: bool = True
                       ) -> tuple[torch.nn.Module, PipelineResult, int]:
    """Load ``model``, calibrate and quantize it in memory (fake-quant weights), without writing.

    Returns the model (its decoder linears hold the dequantized weights), the pipeline's result (the
    quantized weights per linear and one record per linear) and the number of calibration samples.
    The quality benchmark uses this directly; :func:`quantize` adds the checkpoint (and ``progress``,
    the store of finished layers an interrupted run resumes from). Loaded lazily (``config.lazy_load``)
    and without ``keep_model``, the returned model's quantized linears hold no weights (the codes do).
    """
    return _quantize_dir(model_dir_of(model), as_config(config), progress, keep_model)


def _quantize_dir(model_dir: Path, config: QuantizeConfig, progress: LayerProgress | None, keep_model: bool
                  ) -> tuple[torch.nn.Module, PipelineResult, int]:
    """:func:`quantize_in_memory` of a resolved, checked model folder (``model_dir_of``)."""
    solver = build_solver(config.method, config.solver)
    device = config.torch_device()
    dtype = config.torch_dtype(read_checkpoint_dtype(model_dir))
    skeleton, structure = load_skeleton(model_dir, dtype)  # from config.json: no weight is read
    check_fits(structure, config)
    needs_data = solver.needs.hessian or config.target_bits is not None
    samples = _calibration_samples(model_dir, config, skeleton, structure) if needs_data else []
    lazy = None
    if choose_lazy_load(model_dir, config.lazy_load):
        hf_model, adapter, lazy = load_model_lazily(model_dir, dtype, skeleton)
    else:
        hf_model, adapter = load_model(model_dir, dtype)
    try:
        allocated = _allocated_bits(hf_model, adapter, samples, config, progress, lazy)
        result = quantize_model(
            hf_model, adapter, solver, config.scheme, samples,
            device=device, offload_device=config.offload_device, ignore=config.ignore,
            head_scheme=config.head_scheme, progress=progress,
            scheme_for=config.scheme_resolver(allocated) if config.overrides or allocated else None,
            lazy_layers=lazy, release_quantized=not keep_model,
        )
    finally:
        if lazy is not None:
            lazy.close()
    return hf_model, result, len(samples)


def _allocated_bits(model: torch.nn.Module, adapter: ModelAdapter, samples, config: QuantizeConfig,
                    progress: LayerProgress | None, lazy) -> dict[str, int] | None:
    """``config.target_bits``' per-linear bits (``vlmptq.allocation``), or None without a target. A resumed run
    takes the interrupted run's allocation from its progress store (the layers it finished were solved with
    it), so the sensitivity pass runs once per output."""
    if config.target_bits is None:
        return None
    stored = progress.fingerprint.get("allocation") if progress is not None and progress.layers_done else None
    if stored is not None:
        logger.info("resuming: taking the interrupted run's bit allocation")
        return stored
    from vlmptq.allocation import choose_bits

    allocated = choose_bits(model, adapter, samples, config, lazy_layers=lazy)
    if progress is not None:
        progress.bind(allocation=allocated)
    return allocated


def _calibration_samples(model_dir: Path, config: QuantizeConfig, skeleton: torch.nn.Module, adapter: ModelAdapter
                         ) -> list[CalibSample]:
    """The calibration samples, encoded before any weight is read (``skeleton``: the model on the meta
    device): a wrong source, a bad sample or a processor that is not the model's costs seconds, not the
    load of a large model."""
    if adapter.text_only:
        check_text_source(config.calib, str(model_dir))
        samples = load_text_calibration(config.calib, load_processor(model_dir, text_only=True))
    else:
        from vlmptq.calib import load_calibration

        samples = load_calibration(config.calib, load_processor(model_dir), sorted(adapter.vision_token_ids()))
    logger.info("calibrating on %d samples from %s", len(samples), config.calib.source)
    _check_token_ids(skeleton, samples)
    return samples


def _check_token_ids(model: torch.nn.Module, samples) -> None:
    """Token ids past the input embeddings would fail deep inside the embedding lookup."""
    rows = model.get_input_embeddings().num_embeddings
    top = max((int(s.inputs["input_ids"].max()) for s in samples), default=-1)
    if top >= rows:
        raise ConfigError(f"the tokenizer produced token id {top}, but the model's input embeddings hold {rows} "
                          "rows: the tokenizer / processor files in the model folder are not this model's")


def _fingerprint(model_dir: Path, config: QuantizeConfig) -> dict:
    """What a resumed run must share with the run it continues (the pipeline adds the calibration
    inputs' digest and the number of layers). The devices may differ: a run started on one GPU can
    continue on another, or on the CPU."""
    from vlmptq import __version__

    settings = config.model_dump(mode="json", exclude={"overwrite", "resume", "device", "offload_device",
                                                          "lazy_load"})
    return {"vlmptq": __version__, "model": model_files_digest(model_dir), "settings": settings}


def _metadata(config: QuantizeConfig, result: PipelineResult, n_samples: int) -> dict:
    """The run's settings, stored in the checkpoint's quantization_config under "vlmptq"."""
    return {
        "method": config.method,
        "scheme": config.scheme.describe() if config.target_bits is None else
                  f"auto {'/'.join(f'W{b}' for b in config.bits_choices)} (target {config.target_bits:g} bits)",
        **({"target_bits": config.target_bits, "code_bits": result.code_bits()} if config.target_bits else {}),
        **({"lm_head": config.head_scheme.describe()} if config.head_scheme else {}),
        **({"overrides": [o.model_dump(exclude_none=True) for o in config.overrides]} if config.overrides else {}),
        "solver": config.solver.model_dump(mode="json", exclude_none=True),
        "calibration": {"source": config.calib.source, "num_samples": n_samples,
                        "max_seq_len": config.calib.max_seq_len, "seed": config.calib.seed},
        "mu": {r.name: r.info["mu"] for r in result.records if "mu" in r.info},
    }


def _base_scheme(config: QuantizeConfig, result: PipelineResult) -> WeightScheme:
    """The scheme of the checkpoint's default config group: the configured one, or with ``target_bits`` the
    one most linears took (the others go to named groups)."""
    if config.target_bits is None or not result.quantized:
        return config.scheme
    return Counter(qw.scheme for qw in result.quantized.values()).most_common(1)[0][0]


def quantize(model: str | Path, out: str | Path, config: QuantizeConfig | Mapping | None = None) -> QuantizeReport:
    """Quantize the Hugging Face VLM ``model`` (a local directory or a Hub id) and write a compressed-tensors
    ``pack-quantized`` checkpoint to ``out``. ``config``: a :class:`QuantizeConfig` (``vlmptq.make_config``), a
    dict of its fields, or None for the defaults.

    Everything that can be checked is checked before the model is loaded (config, output directory,
    architecture, the options against the layers' shapes, the weight files' headers, the calibration set:
    encoded first); ``out`` is only ever replaced by a complete checkpoint. The decoder layers finished so
    far are kept in ``<out>.vlmptq-progress/`` until it is: ``config.resume`` continues a run that stopped
    (``vlmptq.pipeline.progress``). One run at a time may write ``out`` (``<out>.vlmptq-lock``).
    """
    t0 = time.perf_counter()
    config = as_config(config)
    with output_lock(out):
        return _quantize_locked(model, Path(out), config, t0)


def _quantize_locked(model: str | Path, out: Path, config: QuantizeConfig, t0: float) -> QuantizeReport:
    check_destination(out.absolute(), config.overwrite, model if Path(model).is_dir() else None)  # a Hub id: later
    model = model_dir_of(model)
    progress = LayerProgress.open(progress_dir_for(out), _fingerprint(model, config), config.resume)
    device = config.torch_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        hf_model, result, n_samples = _quantize_dir(model, config, progress, keep_model=False)
        summary = save_quantized_checkpoint(
            hf_model, result.quantized, out, scheme=_base_scheme(config, result), ignore=result.frozen,
            source_dir=model, metadata=_metadata(config, result, n_samples), overwrite=config.overwrite,
        )
    except BaseException:
        if progress.layers_done:
            logger.warning("%s kept in %s: run the same command with --resume to continue from them",
                           progress.describe(), progress.root)
        raise
    progress.discard()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return QuantizeReport(summary, result.records, n_samples, time.perf_counter() - t0, peak)
