"""Tensors of the source checkpoint that the model transformers builds does not hold, carried into the output.

Some releases hold layers their transformers class leaves out: multi-token-prediction (MTP) layers (Qwen3.5's
and EXAONE 4.5's ``mtp.*``, GLM-4.5V's ``model.language_model.layers.46.*``) and weights a class drops as dead
(Gemma 4's keys and values of its KV-shared layers). vLLM reads them from the checkpoint as it reads them from the
source (the MTP drafter of ``--speculative-config '{"method": "mtp", ...}'`` is built from them), so the output
holds them as the source files do: same names, shapes, dtypes and bytes, never quantized, every linear among them
(a 2-D ``<module>.weight``, or a transformers-5 fused expert tensor) listed in the config's ``ignore``.

Which tensors: the names of the source's safetensors files that, put through the model's renamings and weight
conversions as transformers' load puts them, name nothing the model holds (:func:`vlmptq.models.adapters.
unbuilt_in_files`: what the load reports unexpected, and what the class drops without a word), recorded on the loaded
model (and on the ``--dry-run`` skeleton) under :data:`UNBUILT`. They are read from the source files one at a time,
while the shard that holds them is written: no copy stays in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmptq.checkpoint.reader import TensorStore

UNBUILT = "vlmptq_unbuilt_tensors"  # attribute of a loaded model: names in its files the model does not hold
_FUSED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}  # [E, out, in] tensors


@dataclass(frozen=True)
class CarriedTensors:
    """The source tensors to carry (``names``, as in the source files) and where to read them."""

    store: TensorStore
    names: tuple[str, ...]

    @classmethod
    def of(cls, model: torch.nn.Module, source_dir: str | Path | None) -> CarriedTensors | None:
        """What ``model``'s load recorded (:data:`UNBUILT`), read from ``source_dir``; None if nothing."""
        names = tuple(getattr(model, UNBUILT, ()) or ())
        if not names or source_dir is None:
            return None
        return cls(TensorStore(source_dir, "model"), names)

    def placeholders(self) -> dict[str, torch.Tensor]:
        """Meta tensors of the carried tensors' shapes and dtypes: what the shard split needs to size them."""
        out = {}
        for name in self.names:
            shape, dtype = self.store.meta(name)
            out[name] = torch.empty(shape, dtype=dtype, device="meta")
        return out

    def load(self, name: str) -> torch.Tensor:
        return self.store.get(name)

    def linears(self) -> list[str]:
        """The ignore-list names of the linears among the carried tensors."""
        return linear_names({n: self.store.meta(n)[0] for n in self.names})

    def nbytes(self) -> int:
        return sum(self.store.nbytes(n) for n in self.names)


def linear_names(shapes: dict[str, Sequence[int]]) -> list[str]:
    """Module names for ``ignore`` of the linears among tensors named as ``shapes``' keys: ``<m>`` for a 2-D
    ``<m>.weight``; for a fused ``<m>.gate_up_proj`` / ``<m>.down_proj`` of shape [E, ...], its experts'
    ``<m>.<e>.gate_proj`` / ``up_proj`` / ``down_proj``, the names vLLM's compressed-tensors code looks up for a
    block of experts. Names of embeddings come along (an ``ignore`` entry keeps one 16-bit, which it is)."""
    out = []
    for name, shape in shapes.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(shape) == 2:
            out.append(module)
        elif leaf in _FUSED_EXPERTS and len(shape) == 3:
            out += [f"{module}.{e}.{p}" for e in range(shape[0]) for p in _FUSED_EXPERTS[leaf]]
    return out
