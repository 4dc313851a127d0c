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


# `make test` runs two pytest-xdist workers, scheduled by whole work units: the tests that start a vLLM
# engine or server are in two units, so each worker runs at most one engine at a time, and each worker's
# engines are bound to a core of their own (VLLM_CPU_OMP_THREADS_BIND below; unbound, both would pick the same
# one); every other module is its own unit, so its module-scoped fixtures (interpreted kernels, AOT compiles,
# solver studies) are built once. (xdist's own `--dist loadgroup` cannot be used: it renames node ids, which
# pytest 9 ignores.)
ENGINE_UNITS = {
    "vllm-engine-a": ("test_demo.py", "test_serve.py", "test_vllm_plugin.py", "test_mtp.py"),
    "vllm-engine-b": ("test_vllm_bad_checkpoints.py", "test_vllm_families.py", "test_vllm_moe.py",
                      "test_vllm_stock.py", "test_proxy.py::test_quantized_proxy_runs_in_vllm"),
}


def work_unit(nodeid: str) -> str:
    """The scheduling unit of a test: one of ``ENGINE_UNITS`` for tests that start vLLM, else its file."""
    path = nodeid.split("::", 1)[0]
    name = nodeid.split("[", 1)[0].rsplit("/", 1)[-1]
    for unit, members in ENGINE_UNITS.items():
        if path.rsplit("/", 1)[-1] in members or name in members:
            return unit
    return path


# the cores this process may run on, read at start-up: an in-process engine binds its process to its own
CPUS = sorted(os.sched_getaffinity(0))


def _bind_engines_to_this_workers_core() -> None:
    """Under xdist (``gwN``), vLLM-CPU engines started by this worker use core N of ``CPUS``, unless the caller
    chose (tensor-parallel tests bind both ranks: ``two_rank_binding``)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and len(CPUS) > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(CPUS[int(worker[2:]) % len(CPUS)])


_bind_engines_to_this_workers_core()


@pytest.fixture
def two_rank_binding(monkeypatch):
    """A two-worker (tensor parallelism 2) engine's ranks on the first and last of ``CPUS``: one NUMA node here,
    which vLLM-CPU's automatic binding does not split."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{CPUS[0]}|{CPUS[-1]}")


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
