"""Offline builders of tiny random VLM checkpoints (real transformers classes) for tests, the
serving benchmark and examples. Nothing here is needed to quantize real models."""
