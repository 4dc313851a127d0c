"""vLLM plugin for vlmptq checkpoints (entry point group ``vllm.general_plugins``).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers). It
registers the ``vlmptq`` quantization config; the checkpoint -> config -> linear method -> kernel
chain is described in :mod:`vllm_plugin.config`, :mod:`vllm_plugin.linear` and
:mod:`vllm_plugin.kernels`. Importing this package does not import vLLM.
"""

from __future__ import annotations

import logging

# Under vLLM's logger tree, so vLLM's handler prints our messages in its own format.
logger = logging.getLogger(f"vllm.plugins.{__name__}")

_registered = False


def register() -> None:
    """Register the ``vlmptq`` quantization method with vLLM (idempotent, imports vLLM lazily)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from vllm_plugin.config import NAME, VlmptqConfig

    register_quantization_config(NAME)(VlmptqConfig)
    _registered = True
    logger.debug("vlmptq: registered quantization method %r", NAME)
