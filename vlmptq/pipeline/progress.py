"""Per-layer progress of a quantization run, so that an interrupted run continues where it stopped.

A 72B model takes hours to quantize one decoder layer at a time; a crash, a pre-empted job or a
Ctrl-C near the end should not cost the layers already solved. ``vlmptq.quantize`` keeps every
finished decoder layer's quantized weights next to the output directory and ``--resume`` reuses them:
the calibration inputs are captured again and pushed through the finished layers (forward passes
only), so the run continues with exactly the streams it had, and the checkpoint is bit-identical to
an uninterrupted run's (tests/integration/test_resume.py). The store is removed once the checkpoint
is written.

Layout (``<out>.vlmptq-progress/``, next to ``--out``):
    manifest.json            {"format": 2, "fingerprint": {...}, "layers": {"<index>": {"file", "records"}}}
    layer-00012.safetensors  for each quantized linear of decoder layer 12 (full module name ``m``):
                             ``m.packed`` int32 [N, ceil(K*b/32)]: the codes as the checkpoint packs
                             them (``vlmptq.checkpoint.packing``; the pipeline holds them so already),
                             ``m.scale`` [N, G] in the model dtype, ``m.zero`` uint8 [N, G]; the file's
                             metadata holds each linear's K, bits, group size and symmetry.
A layer file is written under a temporary name, flushed and renamed, then the manifest is rewritten the
same way: a crash at any moment leaves whole layers only. The fingerprint (package version, model
files, every option that changes the result, the calibration inputs' digest, the number of layers)
must match for a resume; where it does not the error names what changed. The lm_head (one linear,
after the last layer) is not stored: a resumed run solves it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vlmptq.errors import CheckpointError, ConfigError
from vlmptq.pipeline.sequential import LinearRecord
from vlmptq.quant.qweight import QuantizedWeight
from vlmptq.quant.scheme import WeightScheme

logger = logging.getLogger(__name__)

FORMAT = 2  # 1: codes in 2/4/8-bit byte fields (before the pipeline held them packed)
MANIFEST = "manifest.json"


def progress_dir_for(out: str | Path) -> Path:
    """Where ``vlmptq.quantize(..., out)`` keeps its finished layers: ``<out>.vlmptq-progress``."""
    out = Path(out).absolute()
    return out.parent / f"{out.name}.vlmptq-progress"


def tensors_digest(tensors: Sequence[torch.Tensor | str]) -> str:
    """sha256 over tensors' dtypes, shapes and bytes (and strings), in order."""
    h = hashlib.sha256()
    for t in tensors:
        if isinstance(t, str):
            h.update(b"s" + t.encode() + b"\0")
            continue
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"t{t.dtype}{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def samples_digest(samples: Sequence[Any]) -> str:
    """Digest of the calibration samples exactly as the pipeline sees them (ids, every model input,
    the modality masks): a resumed run must calibrate on the same data."""
    parts: list[torch.Tensor | str] = []
    for s in samples:
        parts.append(s.sample_id)
        for key in sorted(s.inputs):
            v = s.inputs[key]
            parts += [key, v if isinstance(v, torch.Tensor) else repr(v)]
        parts += [s.vision_mask, s.text_mask]
    return tensors_digest(parts)


DIGEST_WINDOWS, DIGEST_WINDOW_BYTES = 16, 1 << 16


def model_files_digest(model_dir: str | Path) -> str:
    """The model folder's config.json bytes, and per weight file its name, size and 16 windows of 64 KiB
    spread over it (first and last included). Reading every weight would take minutes on a large model;
    1 MiB per file does not, and a changed file (another fine-tune of the same architecture, same size)
    differs in every window that holds weights."""
    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt", ".gguf") or f.name.endswith(".index.json"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}:".encode() + _sampled_content(f, size) + b"\0")
    return h.hexdigest()


def _sampled_content(path: Path, size: int) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= DIGEST_WINDOWS * DIGEST_WINDOW_BYTES:
            h.update(fh.read())
        else:
            for i in range(DIGEST_WINDOWS):
                fh.seek(i * (size - DIGEST_WINDOW_BYTES) // (DIGEST_WINDOWS - 1))
                h.update(fh.read(DIGEST_WINDOW_BYTES))
    return h.digest()


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {_short(a)} then, {_short(b)} now")
    return out


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:16] + "..." + s[-8:]


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class LayerProgress:
    """The finished decoder layers of one run (see the module docstring for the layout).

    ``open`` checks an existing store against this run's fingerprint before any work; the pipeline
    adds what it learns later (``bind``: calibration digest, number of layers), asks ``load`` for
    each layer and ``save``s the ones it solves. Nothing is created on disk until the first ``save``.
    """

    def __init__(self, root: Path, fingerprint: dict[str, Any], layers: dict[str, Any] | None = None):
        self.root = root
        self.fingerprint = fingerprint
        self._layers: dict[str, Any] = layers or {}
        self._failed = False

    @classmethod
    def open(cls, root: str | Path, fingerprint: dict[str, Any], resume: bool) -> LayerProgress:
        root = Path(root)
        manifest = root / MANIFEST
        if not manifest.exists():  # nothing stored (or stopped before its first layer was recorded)
            if resume:
                logger.info("--resume: no earlier progress in %s, starting from the first layer", root)
            return cls(root, fingerprint)
        try:
            data = json.loads(manifest.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            stored_fp, layers = data["fingerprint"], data["layers"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{root} is not a readable vlmptq progress directory ({e}); delete it to start over."
            ) from None
        done = _describe_layers(layers)
        changed = _differences({k: v for k, v in stored_fp.items() if k in fingerprint}, fingerprint)
        if changed:
            raise ConfigError(
                f"{'cannot resume from ' if resume else ''}{root}{':' if resume else ''} holds {done} of an "
                f"earlier, interrupted run with other settings ({'; '.join(changed)}). Rerun with those "
                f"settings{'' if resume else ' and --resume'} to continue it, or delete it to start over."
            )
        if not resume:
            raise ConfigError(
                f"{root} holds {done} of an earlier, interrupted run for this output; pass --resume "
                f"(QuantizeConfig.resume=True) to continue from it, or delete it to start over."
            )
        logger.info("resuming: %s already quantized (%s)", done, root)
        return cls(root, stored_fp, layers)

    @property
    def layers_done(self) -> list[int]:
        return sorted(int(k) for k in self._layers)

    def describe(self) -> str:
        """E.g. "12 finished decoder layers (0-11)"."""
        return _describe_layers(self._layers)

    def bind(self, **facts: Any) -> None:
        """Add facts known once the run has started (calibration digest, number of layers); a stored
        run must have the same ones."""
        if self._layers:
            changed = _differences({k: self.fingerprint.get(k) for k in facts}, facts)
            if changed:
                raise ConfigError(
                    f"cannot resume from {self.root}: {'; '.join(changed)} (e.g. other calibration data). "
                    f"Rerun with the earlier data, or delete it to start over."
                )
        self.fingerprint.update(facts)

    def load(self, index: int) -> tuple[dict[str, QuantizedWeight], list[LinearRecord]] | None:
        """Layer ``index``'s quantized linears (full names) and records, or None if not stored."""
        entry = self._layers.get(str(index))
        if entry is None:
            return None
        path = self.root / entry["file"]
        try:
            weights = {}
            with safe_open(path, "pt") as f:
                for name, m in json.loads(f.metadata()["linears"]).items():
                    scheme = WeightScheme(m["bits"], m["group_size"], m["symmetric"])
                    weights[name] = QuantizedWeight.from_packed(
                        f.get_tensor(f"{name}.packed"), m["in_features"], f.get_tensor(f"{name}.scale"),
                        f.get_tensor(f"{name}.zero"), scheme)
        except (OSError, SafetensorError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"{path} (decoder layer {index} of the run being resumed) cannot be read ({e}); delete "
                f"{self.root} to start over."
            ) from None
        records = [LinearRecord(**{**r, "shape": tuple(r["shape"])}) for r in entry["records"]]
        return weights, records

    def save(self, index: int, weights: Mapping[str, QuantizedWeight], records: Sequence[LinearRecord]) -> None:
        """Store layer ``index``. A failure to write (disk full, ...) is logged once and the run goes
        on without progress: losing the ability to resume must not cost the run itself."""
        if self._failed:
            return
        name = f"layer-{index:05d}.safetensors"
        tensors, meta = {}, {}
        for full, qw in weights.items():
            s = qw.scheme
            tensors[f"{full}.packed"] = qw.packed_rows().contiguous()
            tensors[f"{full}.scale"] = qw.scale.contiguous()
            tensors[f"{full}.zero"] = qw.zero.contiguous()
            meta[full] = {"in_features": qw.shape[1], "bits": s.bits, "group_size": s.group_size,
                          "symmetric": s.symmetric}
        entry = {"file": name, "records": [dataclasses.asdict(r) for r in records]}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _write_atomically(self.root / name,
                              lambda p: save_file(tensors, str(p), metadata={"linears": json.dumps(meta)}))
            layers = {**self._layers, str(index): entry}
            text = json.dumps({"format": FORMAT, "fingerprint": self.fingerprint, "layers": layers}, indent=1,
                              default=str)
            _write_atomically(self.root / MANIFEST, lambda p: p.write_text(text))
            self._layers = layers
        except (OSError, SafetensorError) as e:  # safetensors reports its I/O errors as SafetensorError
            self._failed = True
            logger.warning("could not save the progress of decoder layer %d in %s (%s); the run goes on, "
                           "but cannot be resumed from here", index, self.root, e)

    def discard(self) -> None:
        """Remove the store (the checkpoint it served is complete): our files, then the folder if that
        leaves it empty (anything else found there is not ours and stays)."""
        if not self.root.is_dir():
            return
        for f in [*self.root.glob("layer-*.safetensors"), self.root / MANIFEST, *self.root.glob(".*.tmp-*")]:
            f.unlink(missing_ok=True)
        try:
            self.root.rmdir()
        except OSError:
            logger.info("left %s in place: it holds files that are not vlmptq's", self.root)


def _describe_layers(layers: Mapping[str, Any]) -> str:
    idx = sorted(int(k) for k in layers)
    if not idx:
        return "no finished layers"
    if len(idx) == 1:
        span = str(idx[0])
    elif idx == list(range(idx[0], idx[-1] + 1)):
        span = f"{idx[0]}-{idx[-1]}"
    else:
        span = ", ".join(map(str, idx))
    return f"{len(idx)} finished decoder layer{'s' if len(idx) > 1 else ''} ({span})"
