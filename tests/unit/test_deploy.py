"""deploy/ files: the server arguments they pass are ones `vllm serve` accepts, and the method they
name is the one our plugin registers (Docker itself cannot run on the CI machines)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def serve_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def _dockerfile_args() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert entry == ["vllm", "serve"]
    return cmd


def _compose_args() -> list[str]:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return [str(a) for a in compose["services"]["vllm"]["command"]]


def _k8s_args() -> list[str]:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "vllm-vlmptq.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert container["ports"][0]["containerPort"] == 8000
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    return [str(a) for a in container["args"]]


@pytest.mark.parametrize("source", [_dockerfile_args, _compose_args, _k8s_args], ids=lambda f: f.__name__[1:-5])
def test_server_arguments_parse_and_use_the_plugin(serve_parser, source):
    args = serve_parser.parse_args(source())  # SystemExit on an unknown or malformed flag
    assert args.model_tag.startswith("/models/")
    assert args.quantization == "vlmptq"
    assert args.port == 8000 and args.host == "0.0.0.0"


def test_the_named_method_is_registered_by_the_plugin():
    import vllm_plugin
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    vllm_plugin.register()
    assert "vlmptq" in QUANTIZATION_METHODS


def test_dockerfile_copies_what_the_package_needs():
    text = (DEPLOY / "Dockerfile").read_text()
    for path in ("pyproject.toml", "vlmptq", "vllm_plugin"):
        assert re.search(rf"^COPY .*\b{path}\b", text, re.M), path
        assert (DEPLOY.parent / path).exists(), path
