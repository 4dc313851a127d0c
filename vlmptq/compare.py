"""``vlmptq compare``: how far a quantized checkpoint's predictions are from its source model's.

A quick check before serving (or before a long lmms-eval run): the source model and each checkpoint
(its linears dequantized into a copy of the source model, in the checkpoint's dtype: what a server
computes with) see the same image+text prompts, teacher-forced, and at every text position after the
image we compare the next-token distributions:

    KL      mean KL(source || quantized) per position, nats (0 = identical predictions)
    top-1   fraction of positions where both predict the same next token
    drift   after each decoder layer, the relative RMS error of the checkpoint's hidden states at those
            positions, ||h_q - h||_2 / ||h||_2 (where the error enters: a guide for --override)

The source model is loaded once (lazily, layer by layer, when it would not fit in host memory) and the
checkpoints' weights are swapped in layer by layer (``vlmptq.pipeline.replay``): the device holds one
decoder layer at a time, so a checkpoint of a model too large for the GPU can be checked on it.

Prompts: the held-out photos that are never in the built-in calibration set, with several questions
and a factual caption each (``vlmptq.demo.evaluate``), or the user's own image-text pairs in any
calibration format (``--data``, ``docs/calibration.md``), preferably pairs the checkpoint was not
calibrated on. A text-only model is compared on text (``--data``: text windows as it calibrates,
``vlmptq.calib.text``) at every position. Values are comparable between checkpoints of one model on
the same prompts, not between models.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmptq.calib import BUILTIN_HOLDOUT, CalibConfig
from vlmptq.checkpoint.reader import QuantizedCheckpoint, open_checkpoint, read_config
from vlmptq.config import resolve_device
from vlmptq.demo.evaluate import (
    EVAL_QUESTIONS, KLSample, checkpoint_modules, compared_positions, divergence, kl_samples,
)
from vlmptq.errors import ConfigError, UnsupportedModelError
from vlmptq.models.adapters import (
    ModelAdapter, load_model, load_model_lazily, load_processor, load_skeleton, read_checkpoint_dtype,
)
from vlmptq.models.lazy import choose_lazy_load
from vlmptq.models.source import model_dir_of, resolve_model
from vlmptq.pipeline.replay import LayerHook, Variant, variant_logprobs

logger = logging.getLogger(__name__)


@dataclass
class ComparisonRow:
    checkpoint: str
    method: str  # from the checkpoint's "vlmptq" marker ("?" for checkpoints of other tools)
    scheme: str
    kl: float  # nats per compared position
    top1: float  # fraction of positions with the same argmax
    positions: int
    prompts: int
    drift: list[float] = field(default_factory=list)  # per decoder layer: ||h_q - h|| / ||h|| at the positions


def _prompts(model_dir: Path, adapter: ModelAdapter, data: CalibConfig | None, photos: int, questions: int
             ) -> list[KLSample]:
    """The held-out photo prompts, or ``data``'s pairs (a text-only model: ``data``'s text windows, compared
    at every position)."""
    processor = load_processor(model_dir, adapter.text_only)
    if adapter.text_only:
        from vlmptq.calib.text import load_text_calibration

        return [KLSample(s, s.text_mask.clone()) for s in load_text_calibration(data, processor)]
    ids = adapter.vision_token_ids()
    if data is None:
        return kl_samples(processor, ids, BUILTIN_HOLDOUT[:photos], EVAL_QUESTIONS[:questions])
    from vlmptq.calib import load_calibration

    return [compared_positions(s) for s in load_calibration(data, processor, sorted(ids))]


def _dequantized(ckpt: QuantizedCheckpoint, disk_name: str, dtype: torch.dtype):
    """Reads and dequantizes one linear of ``ckpt`` on the device it is asked for (as dequantize_into does)."""
    return lambda device: ckpt.quantized_weight(disk_name).to(device).dequantize(torch.float32).to(dtype)


def _check_comparable(adapter: ModelAdapter, model_dir: Path, data: CalibConfig | None) -> None:
    """compare needs prompts the model takes, and a final norm and lm_head to compute the logits layer by layer."""
    if adapter.text_only and data is None:
        from vlmptq.calib.text import TEXT_FORMS

        raise ConfigError(f"{model_dir} is a text-only model and the held-out prompts are photos; compare it on "
                          f"text with --data: {TEXT_FORMS}")
    try:
        adapter.final_norm()
        adapter.lm_head()
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"compare cannot compute the logits of {model_dir} layer by layer: "
                                    f"{str(e).partition(';')[0]}") from None


def _drift_recorder(drift: list[list[float]], positions: Sequence[torch.Tensor]) -> LayerHook:
    """Appends each checkpoint's relative hidden-state error after every decoder layer to ``drift``."""
    def record(_layer: int, hidden: list[list[torch.Tensor]]) -> None:
        ref = [h[0][p].float() for h, p in zip(hidden[0], positions)]
        norm = sum(float(r.pow(2).sum()) for r in ref)
        for vi, errs in enumerate(drift, start=1):
            diff = sum(float((h[0][p].float() - r).pow(2).sum()) for h, p, r in zip(hidden[vi], positions, ref))
            errs.append(math.sqrt(diff / norm) if norm > 0 else float("nan"))
    return record


def compare(model: str | Path, checkpoints: Sequence[str | Path], *, data: CalibConfig | None = None,
            photos: int = len(BUILTIN_HOLDOUT), questions: int = 2, device: str = "auto",
            dtype: torch.dtype | None = None, lazy_load: bool | None = None) -> list[ComparisonRow]:
    """One :class:`ComparisonRow` per checkpoint of ``model`` (see the module docstring). ``lazy_load``:
    read the source model's decoder layers from its files one at a time (None: when the weights would
    not fit in the available host memory, as ``vlmptq quantize`` decides)."""
    if not checkpoints:
        raise ConfigError("give at least one checkpoint to compare with the source model")
    if data is None and not (1 <= photos <= len(BUILTIN_HOLDOUT) and 1 <= questions <= len(EVAL_QUESTIONS)):
        raise ConfigError(f"photos takes 1..{len(BUILTIN_HOLDOUT)} and questions 1..{len(EVAL_QUESTIONS)}, "
                          f"got {photos} and {questions}")
    dev = resolve_device(device)
    names = [str(c) for c in checkpoints]
    checkpoints = [resolve_model(c, role="checkpoint") for c in checkpoints]  # folders, or Hub ids (HF cache)
    opened = [open_checkpoint(c) for c in checkpoints]  # unreadable checkpoints fail before any work
    model_dir = model_dir_of(model)
    dtype = dtype or read_checkpoint_dtype(checkpoints[0]) or torch.bfloat16
    skeleton = load_skeleton(model_dir, dtype)[1]  # from config.json: no weights read yet
    _check_comparable(skeleton, model_dir, data)
    for ck in opened:  # a checkpoint of another model fails here, before the model loads
        checkpoint_modules(skeleton.model, ck)
    prompts = _prompts(model_dir, skeleton, data, photos, questions)
    lazy = None
    if choose_lazy_load(model_dir, lazy_load):
        source, adapter, lazy = load_model_lazily(model_dir, dtype, skeleton.model)
    else:
        source, adapter = load_model(model_dir, dtype)
    try:
        variants = [Variant("source model")] + [
            Variant(Path(c).name, {m: _dequantized(ck, d, dtype) for m, d in checkpoint_modules(source, ck).items()})
            for c, ck in zip(checkpoints, opened)]
        drift: list[list[float]] = [[] for _ in checkpoints]
        results = variant_logprobs(source, adapter, [p.sample for p in prompts], [p.positions for p in prompts],
                                   variants, dev, lazy, on_layer=_drift_recorder(drift, [p.positions for p in prompts]))
        _, reference = next(results)
        rows = []
        for (_, predicted), name, ckpt, opened_ckpt in zip(results, names, checkpoints, opened, strict=True):
            kl, top1, n = divergence(reference, predicted)
            marker = read_config(ckpt).get("quantization_config", {}).get("vlmptq", {})
            rows.append(ComparisonRow(name, marker.get("method", "?"), opened_ckpt.describe(), kl, top1, n,
                                      len(prompts), drift[len(rows)]))
            logger.info("%s: KL %.4f nats/token, top-1 agreement %.1f%%", ckpt, kl, 100 * top1)
    finally:
        if lazy is not None:
            lazy.close()
    return rows


def format_drift(rows: Sequence[ComparisonRow]) -> str:
    """A markdown table: per decoder layer, each checkpoint's relative hidden-state error (%) after it."""
    lines = ["| decoder layer | " + " | ".join(r.checkpoint for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for li in range(max((len(r.drift) for r in rows), default=0)):
        lines.append(f"| {li} | " + " | ".join(f"{100 * r.drift[li]:.2f}%" for r in rows) + " |")
    return "\n".join(lines)


def format_rows(rows: Sequence[ComparisonRow]) -> str:
    lines = ["| checkpoint | method | scheme | KL vs source (nats/token) | top-1 agreement | positions (prompts) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.checkpoint} | {r.method} | {r.scheme} | {r.kl:.4f} | {100 * r.top1:.1f}% | "
                     f"{r.positions} ({r.prompts}) |")
    return "\n".join(lines)
