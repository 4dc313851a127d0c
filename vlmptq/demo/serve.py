"""Start a vLLM OpenAI-compatible server on a free local port, wait until it is healthy, stop it.

    with vllm_server(checkpoint, quantization="vlmptq") as base_url:   # "http://127.0.0.1:PORT/v1"
        OpenAI(base_url=base_url, api_key="none").chat.completions.create(...)

The server runs ``<venv>/bin/vllm serve`` (on the CPU build that is the wrapper from
scripts/setup_venv.sh) in its own process group, with its output in a log file; on exit it gets
SIGINT (vLLM's clean shutdown), then SIGKILL if it has not stopped within ``stop_timeout``. Caches
and sockets stay inside the project (``VLLM_CACHE_ROOT``, ``TMPDIR``; the Makefile sets them, and
they default to ``./.cache/vllm`` and ``./.tmp`` here otherwise).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

# Small, fixed budgets: a 2-core CPU machine shared with other work (see docs/environment.md).
CPU_SERVER_ARGS = ("--max-model-len", "2048", "--max-num-seqs", "4", "--limit-mm-per-prompt", '{"image": 1}',
                   "--kv-cache-memory-bytes", str(1 << 29), "--enforce-eager")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    """The ``vllm`` CLI of this environment (next to the running interpreter, else on PATH)."""
    local = Path(sys.executable).parent / "vllm"
    if local.is_file():
        return [str(local)]
    found = shutil.which("vllm")
    if found:
        return [found]
    raise FileNotFoundError("no `vllm` command found next to this Python or on PATH; install vLLM "
                            "(`pip install .[serve]` on GPU machines, `make venv` for the CPU build)")


def project_env() -> dict[str, str]:
    """The environment for the server: caches and temp files inside the project unless already set."""
    env = dict(os.environ)
    root = Path.cwd()
    env.setdefault("VLLM_CACHE_ROOT", str(root / ".cache" / "vllm"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / ".cache" / "inductor"))
    env.setdefault("TMPDIR", str(root / ".tmp"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    for key in ("VLLM_CACHE_ROOT", "TMPDIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log's tail) if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {proc.returncode} before becoming healthy; "
                               f"last lines of {log}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"vLLM did not become healthy within {timeout:.0f}s; last lines of {log}:\n{_tail(log)}")


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGINT to the server's process group (clean shutdown), SIGKILL after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        logger.warning("vLLM did not stop within %.0fs; killing it", timeout)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


@contextmanager
def vllm_server(model: str | Path, *, quantization: str | None = "vlmptq", host: str = "127.0.0.1",
                port: int | None = None, extra_args: Sequence[str] = CPU_SERVER_ARGS,
                log_path: Path | None = None, start_timeout: float = 600.0,
                stop_timeout: float = 30.0) -> Iterator[str]:
    """Serve ``model`` with ``vllm serve`` and yield the OpenAI base URL; always shuts it down."""
    port = port or free_port(host)
    env = project_env()
    log_path = Path(log_path or Path(env["TMPDIR"]) / f"vllm-serve-{port}.log")
    cmd = [*vllm_command(), "serve", str(model), "--host", host, "--port", str(port), *extra_args]
    if quantization:
        cmd += ["--quantization", quantization]
    logger.info("starting: %s (log: %s)", " ".join(cmd), log_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(f"http://{host}:{port}/health", proc, log_path, start_timeout)
        yield f"http://{host}:{port}/v1"
    finally:
        stop(proc, stop_timeout)
