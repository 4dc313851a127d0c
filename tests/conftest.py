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


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory):
    """Path of a tiny random Qwen3-VL checkpoint (bf16, 2 decoder layers; deepstack features from the
    vision tower's 2 blocks are added after decoder layers 0 and 1)."""
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-qwen3-vl"), arch="qwen3_vl")


@pytest.fixture(scope="session")
def tiny_qwen2_vl_tied(tmp_path_factory):
    """A tiny Qwen2-VL with tied embeddings and a 2040-token vocabulary: quantizing the LM head must
    untie it; vLLM pads the head to 2048 rows (8 zero rows), and 3-bit zero points end mid-word
    (2040 x 3 bits = 191.25 words)."""
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-qwen2-vl-tied"), arch="qwen2_vl",
                              tie_word_embeddings=True, vocab_size=2040)
