"""Start a vLLM OpenAI-compatible server on a free local port, wait until it is healthy, stop it.

    with VllmServer(checkpoint, ["--quantization", "vlmptq"]) as server:
        OpenAI(base_url=server.base_url + "/v1", api_key="none").chat.completions.create(...)

The one launcher of the project (the demo, the serving benchmark and the tests use it). The server
runs ``<venv>/bin/vllm serve`` (on the CPU build that is the wrapper from scripts/setup_venv.sh) in
its own process group with its output in a log file. :meth:`VllmServer.stop` sends SIGINT to the API
server (what Ctrl-C sends; it shuts its engine down), SIGKILL to the whole group if it has not exited
within the timeout, and returns the exit code.

Caches and temporary files stay inside the project unless already set (``VLLM_CACHE_ROOT``,
``TMPDIR``, ...; the Makefile sets them). vLLM binds its ZeroMQ IPC sockets under
``VLLM_RPC_BASE_PATH`` (default: the temp dir), and a Unix socket path may hold at most 107 bytes:
when the temp dir is too deep for that (a project checked out deep in a file system, a pytest
tmp_path) the sockets go to a short private directory under /tmp instead, removed on stop.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# Small, fixed budgets for a 2-core CPU machine shared with other work (see docs/environment.md).
CPU_SERVER_ARGS = ("--max-model-len", "2048", "--max-num-seqs", "4", "--limit-mm-per-prompt", '{"image": 1}',
                   "--kv-cache-memory-bytes", str(1 << 29), "--enforce-eager")

# sizeof(sockaddr_un.sun_path) - 1; vLLM's IPC path is "<base>/<uuid4>" (36 characters)
_IPC_PATH_MAX = 107
_UUID_LEN = 36


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


def project_env(extra: dict[str, str] | None = None, root: Path | None = None) -> dict[str, str]:
    """The environment for vLLM processes: caches and temp files under ``root`` (default: the
    current directory) unless already set; ``extra`` is applied last."""
    env = dict(os.environ)
    root = Path(root or Path.cwd())
    for key, sub in (("VLLM_CACHE_ROOT", ".cache/vllm"), ("TORCHINDUCTOR_CACHE_DIR", ".cache/inductor"),
                     ("HF_HOME", ".cache/hf"), ("TMPDIR", ".tmp")):
        env.setdefault(key, str(root / sub))
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine in its own process
    env.update(extra or {})
    return env


def ipc_base_too_long(env: dict[str, str]) -> bool:
    base = env.get("VLLM_RPC_BASE_PATH") or env.get("TMPDIR") or tempfile.gettempdir()
    return len(base) + 1 + _UUID_LEN > _IPC_PATH_MAX


class VllmServer:
    """``vllm serve MODEL --host 127.0.0.1 --port PORT *args`` as a context manager."""

    def __init__(self, model: str | Path, args: Sequence[str] = CPU_SERVER_ARGS, env: dict[str, str] | None = None,
                 log_path: Path | None = None, port: int | None = None, host: str = "127.0.0.1",
                 root: Path | None = None):
        self.model, self.host, self.port = str(model), host, port or free_port(host)
        self.cmd = [*vllm_command(), "serve", self.model, "--host", host, "--port", str(self.port), *args]
        self.env = project_env(env, root)  # caches under root (default: the current directory)
        self._ipc_dir: str | None = None
        if ipc_base_too_long(self.env):
            self._ipc_dir = tempfile.mkdtemp(prefix="vlmptq-ipc-", dir="/tmp")
            self.env["VLLM_RPC_BASE_PATH"] = self._ipc_dir
        self.log_path = Path(log_path or Path(self.env["TMPDIR"]) / f"vllm-serve-{self.port}.log")
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (the OpenAI API is under ``/v1``)."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 600) -> VllmServer:
        """Launch and poll ``/health`` until it answers 200; fail early, with the log's tail, if the
        server exits first; stop it and raise ``TimeoutError`` after ``timeout`` seconds."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        logger.info("starting: %s (log: %s)", shlex.join(self.cmd), self.log_path)
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.stop()
                raise RuntimeError(f"vllm serve exited with code {code} during startup; last lines of "
                                   f"{self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {timeout:.0f}s; last lines of {self.log_path}:\n"
                           f"{self.log_tail()}")

    def stop(self, timeout: float = 60) -> int | None:
        """SIGINT to the API server, SIGKILL to its process group if it has not exited in time; any
        process left in the group afterwards is killed too. Returns the server's exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("vllm serve did not stop within %.0fs; killing its process group", timeout)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group outlives its leader only on a failure
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None
        return self.proc.returncode

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def kernels(self) -> list[str]:
        """Which linear kernels the server logged (ours and vLLM's), in order of appearance."""
        text = self.log_path.read_text(errors="replace")
        found = re.findall(r"vlmptq: (.+?) layers run on the '(\w+)' kernel", text)
        out = [f"{k} ({s})" for s, k in found]
        out += sorted(set(re.findall(r"Using (\w+) for CompressedTensorsWNA16", text)))
        return out

    def __enter__(self) -> VllmServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
