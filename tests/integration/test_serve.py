"""``vllm serve CKPT --quantization vlmptq`` on 127.0.0.1: an OpenAI chat completion with a base64
image, ``vllm bench serve --dataset-name random-mm`` with no failed request, a clean shutdown.

One server for the module (startup is the expensive part); the tests run in file order and the last
one stops it. The launcher and the bench runner are the serving benchmark's own
(``benchmarks/serve.py``), so the benchmark is exercised here too.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import time

import pytest

from benchmarks.serve import BenchLoad, run_bench
from tests.support.quantized_checkpoint import build_quantized_checkpoint, pattern_image
from vlmptq.quant.scheme import WeightScheme
from vlmptq.server import VllmServer

pytestmark = pytest.mark.slow

SERVER_ARGS = [
    "--quantization",
    "vlmptq",
    "--max-model-len",
    "2048",
    "--max-num-seqs",
    "4",
    "--kv-cache-memory-bytes",
    str(1 << 28),
    "--limit-mm-per-prompt",
    '{"image": 1}',
    "--enforce-eager",
]


@pytest.fixture(scope="module")
def ckpt(tiny_qwen2_5_vl, tmp_path_factory):
    return build_quantized_checkpoint(
        tiny_qwen2_5_vl, tmp_path_factory.mktemp("w3"), WeightScheme(3, 64, False)
    )


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    srv = VllmServer(
        ckpt.path, SERVER_ARGS, log_path=tmp_path_factory.mktemp("serve") / "server.log"
    )
    srv.start(timeout=600)
    yield srv
    srv.stop()  # no-op when the shutdown test already stopped it


def test_chat_completion_with_a_base64_image(server):
    from openai import OpenAI

    buf = io.BytesIO()
    pattern_image().save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model=server.model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
        max_tokens=12,
        temperature=0.0,
    )
    assert raw.status_code == 200
    resp = raw.parse()
    assert resp.usage.completion_tokens > 0
    assert resp.usage.prompt_tokens > 20  # 140x112 px -> 20 vision tokens, plus the text
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert server.kernels() and all("W3 g64 asym" in k for k in server.kernels()), server.kernels()


def test_bench_random_mm_completes_every_request(server, ckpt, tmp_path):
    load = BenchLoad(
        num_prompts=8, max_concurrency=4, input_len=32, output_len=16, image_size=224, warmups=1
    )
    result = run_bench(server, ckpt.path, load, tmp_path / "bench.json")
    assert result["completed"] == 8 and result["failed"] == 0
    assert result["total_output_tokens"] == 8 * 16  # --ignore-eos: every request ran to length
    assert result["request_throughput"] > 0 and result["mean_tpot_ms"] > 0


def test_server_shuts_down_cleanly(server):
    assert server.stop(timeout=60) == 0, server.log_tail()
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", server.port), timeout=5),
    ):
        pass  # nothing listens on the port any more
    deadline = time.monotonic() + 30
    while True:  # the engine-core process (same process group) is gone too
        try:
            os.killpg(server.proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "vLLM processes still alive after the API server exited"
        time.sleep(0.5)
