"""vlmptq: asymmetric, modality-aware post-training quantization for vision-language models.

    import vlmptq
    report = vlmptq.quantize("Qwen2.5-VL-7B-Instruct", "qwen-w3",
                             vlmptq.QuantizeConfig(method="vlmptq", bits=3, group_size=128))

Attributes are imported lazily so that light users (the vLLM plugin reads only
``vlmptq.checkpoint.packing``) do not pay for transformers and compressed-tensors.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "quantize": "vlmptq.api",
    "QuantizeReport": "vlmptq.api",
    "quantize_in_memory": "vlmptq.api",
    "QuantizeConfig": "vlmptq.config",
    "make_config": "vlmptq.config",
    "CalibConfig": "vlmptq.calib",
    "SolverOptions": "vlmptq.solvers",
    "WeightScheme": "vlmptq.quant.scheme",
    "inspect_checkpoint": "vlmptq.checkpoint.reader",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmptq' has no attribute {name!r}")
