"""Shared fixtures: tiny random VLM checkpoints (built once per test session) and temp dirs."""

from __future__ import annotations

import os

import pytest

from vlmptq.testing.tiny_vlm import build_tiny_qwen_vl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory):
    """Path of a tiny random Qwen2-VL checkpoint (bf16, 2 decoder layers)."""
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"), arch="qwen2_vl")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory):
    """Path of a tiny random Qwen2.5-VL checkpoint (bf16, 2 decoder layers)."""
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-qwen2-5-vl"), arch="qwen2_5_vl")
