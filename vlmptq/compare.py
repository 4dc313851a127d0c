"""``vlmptq compare``: how far a quantized checkpoint's predictions are from its source model's.

A quick check before serving (or before a long lmms-eval run): the source model and each checkpoint
(its linears dequantized into a copy of the source model, in the checkpoint's dtype: what a server
computes with) see the same image+text prompts, teacher-forced, and at every text position after the
image we compare the next-token distributions:

    KL      mean KL(source || quantized) per position, nats (0 = identical predictions)
    top-1   fraction of positions where both predict the same next token

Prompts: the held-out photos that are never in the built-in calibration set, with several questions
and a factual caption each (``vlmptq.demo.evaluate``), or the user's own image-text pairs in any
calibration format (``--data``, ``docs/calibration.md``), preferably pairs the checkpoint was not
calibrated on. Values are comparable between checkpoints of one model on the same prompts, not
between models.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmptq.calib import BUILTIN_HOLDOUT, CalibConfig
from vlmptq.checkpoint.reader import inspect_checkpoint, read_config
from vlmptq.demo.evaluate import (
    EVAL_QUESTIONS, KLSample, compared_positions, dequantize_into, divergence, kl_samples, reference_logprobs,
)
from vlmptq.config import resolve_device
from vlmptq.errors import ConfigError
from vlmptq.models.adapters import load_model, load_processor, read_checkpoint_dtype
from vlmptq.models.source import model_dir_of, resolve_model

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


def _prompts(model_dir: Path, adapter, data: CalibConfig | None, photos: int, questions: int) -> list[KLSample]:
    processor = load_processor(model_dir)
    ids = adapter.vision_token_ids()
    if data is None:
        return kl_samples(processor, ids, BUILTIN_HOLDOUT[:photos], EVAL_QUESTIONS[:questions])
    from vlmptq.calib import load_calibration

    return [compared_positions(s) for s in load_calibration(data, processor, sorted(ids))]


def compare(model: str | Path, checkpoints: Sequence[str | Path], *, data: CalibConfig | None = None,
            photos: int = len(BUILTIN_HOLDOUT), questions: int = 2, device: str = "auto",
            dtype: torch.dtype | None = None) -> list[ComparisonRow]:
    """One :class:`ComparisonRow` per checkpoint of ``model`` (see the module docstring)."""
    if not checkpoints:
        raise ConfigError("give at least one checkpoint to compare with the source model")
    if data is None and not (1 <= photos <= len(BUILTIN_HOLDOUT) and 1 <= questions <= len(EVAL_QUESTIONS)):
        raise ConfigError(f"photos takes 1..{len(BUILTIN_HOLDOUT)} and questions 1..{len(EVAL_QUESTIONS)}, "
                          f"got {photos} and {questions}")
    dev = resolve_device(device)
    names = [str(c) for c in checkpoints]
    checkpoints = [resolve_model(c) for c in checkpoints]  # folders, or Hub ids from the HF cache
    reports = [inspect_checkpoint(c) for c in checkpoints]  # unreadable checkpoints fail before any work
    model_dir = model_dir_of(model)
    dtype = dtype or read_checkpoint_dtype(checkpoints[0]) or torch.bfloat16
    source, adapter = load_model(model_dir, dtype)
    prompts = _prompts(model_dir, adapter, data, photos, questions)
    reference = reference_logprobs(source.to(dev).eval(), prompts, "source model")
    del source
    rows = []
    for name, ckpt, report in zip(names, checkpoints, reports):
        quantized, _ = load_model(model_dir, dtype)
        dequantize_into(quantized, Path(ckpt))
        kl, top1, n = divergence(reference, reference_logprobs(quantized.to(dev).eval(), prompts, Path(ckpt).name))
        del quantized
        marker = read_config(ckpt).get("quantization_config", {}).get("vlmptq", {})
        rows.append(ComparisonRow(name, marker.get("method", "?"), report.scheme, kl, top1, n, len(prompts)))
        logger.info("%s: KL %.4f nats/token, top-1 agreement %.1f%%", ckpt, kl, 100 * top1)
    return rows


def format_rows(rows: Sequence[ComparisonRow]) -> str:
    lines = ["| checkpoint | method | scheme | KL vs source (nats/token) | top-1 agreement | positions (prompts) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.checkpoint} | {r.method} | {r.scheme} | {r.kl:.4f} | {100 * r.top1:.1f}% | "
                     f"{r.positions} ({r.prompts}) |")
    return "\n".join(lines)
