"""vlmptq: asymmetric, modality-aware post-training quantization for vision-language models."""

__version__ = "0.1.0"
