"""vlmptq.server's environment rules (the server itself runs in tests/integration/test_serve.py)."""

from __future__ import annotations

from vlmptq.server import ipc_base_too_long, project_env


def test_project_env_keeps_caches_in_the_project_unless_set(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    monkeypatch.setenv("HF_HOME", "/somewhere/else")
    env = project_env({"VLLM_CPU_INT4_W4A8": "0"}, root=tmp_path)
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / ".cache/vllm") and (tmp_path / ".cache/vllm").is_dir()
    assert env["HF_HOME"] == "/somewhere/else"
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_INT4_W4A8"] == "0"


def test_ipc_sockets_move_out_of_a_temp_dir_too_deep_for_unix_sockets():
    # vLLM binds "<VLLM_RPC_BASE_PATH or TMPDIR>/<uuid4>"; sun_path holds 107 bytes
    assert not ipc_base_too_long({"TMPDIR": "/tmp"})
    assert not ipc_base_too_long({"TMPDIR": "/" + "x" * 69})
    assert ipc_base_too_long({"TMPDIR": "/" + "x" * 70})
    assert not ipc_base_too_long({"TMPDIR": "/" + "x" * 200, "VLLM_RPC_BASE_PATH": "/tmp"})
