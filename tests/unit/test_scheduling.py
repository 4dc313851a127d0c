"""`make test`'s xdist scheduling (tests/conftest.py): every test that starts vLLM is in one of the engine units."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import ENGINE_UNITS, work_unit

TESTS = Path(__file__).resolve().parents[1]
# what starts a vLLM engine or server in this suite
STARTS_VLLM = re.compile(r"\bvllm_engine\(|\bVllmServer\(|\bLLM\(|\"vlmptq\.demo\"|\bvllm serve\b")
MEMBERS = {m for members in ENGINE_UNITS.values() for m in members}


def test_every_test_that_starts_vllm_runs_in_an_engine_unit():
    missing = []
    for path in sorted(TESTS.glob("*/test_*.py")):
        if path.name in MEMBERS:
            continue
        src = path.read_text()
        for node in ast.parse(src).body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if STARTS_VLLM.search(ast.get_source_segment(src, node)):
                test = f"{path.name}::{node.name}"
                if not (node.name.startswith("test_") and test in MEMBERS):
                    missing.append(test)
    assert not missing, (f"{missing} start vLLM: add the module (or the test) to one of ENGINE_UNITS in "
                         "tests/conftest.py so it never runs beside another engine on its worker")


def test_work_units():
    assert work_unit("tests/integration/test_serve.py::test_server_shuts_down_cleanly") == "vllm-engine-a"
    assert work_unit("tests/integration/test_vllm_plugin.py::test_tp[w2-bf16]") == "vllm-engine-a"
    assert work_unit("tests/integration/test_vllm_moe.py::test_tensor_parallel_2") == "vllm-engine-b"
    assert work_unit("tests/integration/test_proxy.py::test_quantized_proxy_runs_in_vllm") == "vllm-engine-b"
    assert work_unit("tests/integration/test_proxy.py::test_proxy_checkpoint_uses_the_layout_vllm_reads") == (
        "tests/integration/test_proxy.py")
    assert work_unit("tests/unit/test_packing.py::test_x[a/b::c]") == "tests/unit/test_packing.py"
