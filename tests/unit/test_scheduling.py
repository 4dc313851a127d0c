"""`make test`'s xdist scheduling (tests/conftest.py): every test that starts vLLM is in the engine unit."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import ENGINE_MODULES, ENGINE_TESTS, work_unit

TESTS = Path(__file__).resolve().parents[1]
# what starts a vLLM engine or server in this suite
STARTS_VLLM = re.compile(r"\bvllm_engine\(|\bVllmServer\(|\bLLM\(|\"vlmptq\.demo\"|\bvllm serve\b")


def test_every_test_that_starts_vllm_runs_in_the_engine_unit():
    missing = []
    for path in sorted(TESTS.glob("*/test_*.py")):
        if path.name in ENGINE_MODULES:
            continue
        src = path.read_text()
        for node in ast.parse(src).body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if STARTS_VLLM.search(ast.get_source_segment(src, node)):
                test = f"{path.name}::{node.name}"
                if not (node.name.startswith("test_") and test in ENGINE_TESTS):
                    missing.append(test)
    assert not missing, (f"{missing} start vLLM: add the module to ENGINE_MODULES (or the test to "
                         "ENGINE_TESTS) in tests/conftest.py so it never runs beside another engine")


def test_work_units():
    assert work_unit("tests/integration/test_serve.py::test_server_shuts_down_cleanly") == "vllm-engine"
    assert work_unit("tests/integration/test_vllm_plugin.py::test_tp[w2-bf16]") == "vllm-engine"
    assert work_unit("tests/integration/test_proxy.py::test_quantized_proxy_runs_in_vllm") == "vllm-engine"
    assert work_unit("tests/integration/test_proxy.py::test_proxy_checkpoint_uses_the_layout_vllm_reads") == (
        "tests/integration/test_proxy.py")
    assert work_unit("tests/unit/test_packing.py::test_x[a/b::c]") == "tests/unit/test_packing.py"
