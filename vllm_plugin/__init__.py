"""vLLM plugin for vlmptq checkpoints (entry point group ``vllm.general_plugins``)."""


def register() -> None:
    """Register the ``vlmptq`` quantization method with vLLM (idempotent, imports vLLM lazily)."""
