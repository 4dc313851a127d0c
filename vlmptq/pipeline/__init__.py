"""The sequential layer-by-layer quantization pipeline."""
