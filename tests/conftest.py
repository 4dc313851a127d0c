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
def tiny_qwen3_vl_moe(tmp_path_factory):
    """A tiny random Qwen3-VL-MoE (2 decoder layers, each MLP 8 routed experts, 2 per token; the experts
    stored transposed, as Qwen3-VL-MoE's releases do)."""
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-qwen3-vl-moe"), arch="qwen3_vl_moe")


@pytest.fixture(scope="session")
def tiny_qwen3_5(tmp_path_factory):
    """A tiny random Qwen3.5 (4 decoder layers: three Gated DeltaNet linear-attention layers, then one full
    attention layer)."""
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-qwen3-5"), arch="qwen3_5", num_layers=4)


@pytest.fixture(scope="session")
def tiny_qwen3_5_moe(tmp_path_factory):
    """The same with a mixture-of-experts MLP in every layer: 8 routed experts (2 per token) and a gated shared
    expert."""
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-qwen3-5-moe"), arch="qwen3_5_moe", num_layers=4)


@pytest.fixture(scope="session")
def tiny_qwen2_vl_tied(tmp_path_factory):
    """A tiny Qwen2-VL with tied embeddings and a 2040-token vocabulary: quantizing the LM head must
    untie it; vLLM pads the head to 2048 rows (8 zero rows), and 3-bit zero points end mid-word
    (2040 x 3 bits = 191.25 words)."""
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-qwen2-vl-tied"), arch="qwen2_vl",
                              tie_word_embeddings=True, vocab_size=2040)


# `make test` runs two pytest-xdist workers, scheduled by whole work units: every test that starts a
# vLLM engine or server is in one unit, so they run one after another on one worker (two engines at
# once would fight over the 2 cores they bind and the ports they pick); every other module is its own
# unit, so its module-scoped fixtures (interpreted kernels, AOT compiles, solver studies) are built
# once. (xdist's own `--dist loadgroup` cannot be used: it renames node ids, which pytest 9 ignores.)
ENGINE_MODULES = ("test_demo.py", "test_serve.py", "test_vllm_bad_checkpoints.py", "test_vllm_families.py",
                  "test_vllm_moe.py", "test_vllm_plugin.py", "test_vllm_stock.py")
ENGINE_TESTS = ("test_proxy.py::test_quantized_proxy_runs_in_vllm",)


def work_unit(nodeid: str) -> str:
    """The scheduling unit of a test: "vllm-engine" for tests that start vLLM, else its file."""
    path = nodeid.split("::", 1)[0]
    name = nodeid.split("[", 1)[0].rsplit("/", 1)[-1]
    return "vllm-engine" if path.rsplit("/", 1)[-1] in ENGINE_MODULES or name in ENGINE_TESTS else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class EngineUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return work_unit(nodeid)

    return EngineUnitScheduling(config, log)


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if the model's weights are loaded: what is checked here needs config.json only."""
    import vlmptq.api as api

    monkeypatch.setattr(api, "load_model", lambda *a: pytest.fail("loaded the model"))
    monkeypatch.setattr(api, "load_model_lazily", lambda *a: pytest.fail("loaded the model"))
