"""Test helpers around written checkpoints: a dense 16-bit copy and a fixed image prompt."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from vlmptq.checkpoint.reader import dequantize_checkpoint
from vlmptq.quant.grid import quantize_rtn
from vlmptq.quant.scheme import WeightScheme


def rtn_quantize_decoder(model: torch.nn.Module, scheme: WeightScheme) -> tuple[dict, list[str]]:
    """RTN-quantize every decoder linear of a loaded VLM (writer-level tests need no calibration);
    every other Linear stays in 16 bit. Returns (module name -> QuantizedWeight, ignored names)."""
    quantized, ignore = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if ".language_model.layers." in name:
                quantized[name] = quantize_rtn(mod.weight.data, scheme, scale_dtype=mod.weight.dtype)
            else:
                ignore.append(name)
    return quantized, ignore


def dense_copy(ckpt: Path, dst: Path) -> Path:
    """A plain 16-bit checkpoint from ``dequantize_checkpoint`` (config without quantization_config),
    loadable by the model's own transformers class: the reload path every test compares against.
    Per-expert weights (``experts.{e}.gate_proj.weight``, ...) are stacked back into transformers' fused
    ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I]."""
    dst.mkdir()
    for f in Path(ckpt).iterdir():
        if f.is_file() and not f.name.startswith("model"):
            shutil.copy2(f, dst / f.name)
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(fuse_experts(dequantize_checkpoint(ckpt)), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``...experts.{e}.{gate,up,down}_proj.weight`` -> transformers' fused ``...experts.{gate_up,down}_proj``."""
    rx = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for k, v in state.items():
        if m := rx.match(k):
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = v
        else:
            out[k] = v
    for path, by_e in experts.items():
        order = sorted(by_e)
        assert order == list(range(len(order))), f"{path}: experts {order}"
        out[f"{path}.gate_up_proj"] = torch.stack([torch.cat((by_e[e]["gate_proj"], by_e[e]["up_proj"]))
                                                   for e in order])
        out[f"{path}.down_proj"] = torch.stack([by_e[e]["down_proj"] for e in order])
    return out


def test_image(size: tuple[int, int] = (150, 100), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def image_prompt_inputs(model_dir: Path, question: str = "What is in this picture?") -> dict[str, torch.Tensor]:
    """Processor inputs for one chat turn with an image, for comparing models' logits."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(text=[text], images=[test_image()], return_tensors="pt"))
