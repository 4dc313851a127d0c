"""The README's examples run: CLI lines parse with the real parser, the Python example quantizes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from vlmptq.cli import build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_cli_lines_parse():
    lines = [ln for block in _blocks("sh") for ln in block.replace("\\\n", " ").splitlines()
             if ln.strip().startswith("vlmptq ")]
    assert len(lines) >= 2
    for line in lines:
        argv = shlex.split(line.split("#")[0])[1:]
        build_parser().parse_args(argv)  # raises SystemExit on an unknown or malformed flag


def test_readme_python_example_runs(tiny_qwen2_vl, tmp_path):
    (code,) = _blocks("python")
    # The example targets a 7B model; point it at the tiny one (K=192 takes g64, not g128).
    code = (code.replace("./Qwen2.5-VL-7B-Instruct", str(tiny_qwen2_vl))
                .replace("./qwen2.5-vl-7b-w3", str(tmp_path / "out"))
                .replace("group_size=128", "group_size=64").replace("num_samples=128", "num_samples=2"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["report"].checkpoint.n_quantized == 14
    assert (tmp_path / "out" / "config.json").exists()
