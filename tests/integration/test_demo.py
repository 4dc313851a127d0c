"""``python -m vlmptq.demo`` end to end on the tiny proxy (the real demo model is the same recipe around
SmolLM2-135M; `make demo` runs that): quantize, quality row, ``vllm serve --quantization vlmptq`` on a
free port, an OpenAI chat completion with a base64 photo, clean shutdown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_on_the_tiny_proxy(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("openai")
    from vlmptq.proxy import tiny_proxy_dir

    model = tiny_proxy_dir(tmp_path / "tiny-proxy", dtype=torch.bfloat16)
    # a deep TMPDIR on purpose: vLLM's IPC sockets must not inherit a path over the 107-byte limit
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / ("deep-" * 12) / "tmp")}
    Path(env["TMPDIR"]).mkdir(parents=True)
    cmd = [sys.executable, "-m", "vlmptq.demo", "--model", str(model), "--out", str(tmp_path / "out"),
           "--num-samples", "2", "--kl-photos", "1", "--max-tokens", "4"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "KL vs unquantized" in out and "prompts on held-out photos" in out
    assert "server healthy at http://127.0.0.1:" in out
    assert "\nA: " in out and "server stopped" in out
    ckpt = tmp_path / "out" / "tiny-proxy-w4g64-vlmptq"
    assert (ckpt / "config.json").is_file()
    # the server's process group is gone: nothing listens on the port any more
    port = int(out.split("server healthy at http://127.0.0.1:")[1].split("/")[0])
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
