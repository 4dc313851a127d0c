"""KL divergence of a quantized VLM's next-token distributions from the unquantized model's, on
image+text prompts built from held-out photos.

The photos are scikit-image's ``BUILTIN_HOLDOUT`` (never in the built-in calibration set), each
paired with several questions and a factual caption as the answer, formatted exactly like
calibration samples (user: image + question, assistant: caption). The KL is measured at every text
position after the image (question, chat markup and answer, teacher-forced), averaged over
positions:

    ref = reference_logprobs(model, samples)    # unquantized model, once
    ... quantize the model in place ...
    kl = mean_kl(model, samples, ref)           # nats per token
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm.auto import tqdm

from vlmptq.calib import BUILTIN_HOLDOUT, CalibConfig, CalibSample
from vlmptq.calib.encode import check_vision_token_ids, encode_record
from vlmptq.calib.records import Record
from vlmptq.errors import CheckpointError

if TYPE_CHECKING:
    from vlmptq.checkpoint.reader import QuantizedCheckpoint

# Written from scikit-image's docstrings and by looking at the photos: nothing invented.
HOLDOUT_CAPTIONS = {
    "chelsea": "A close-up photo of Chelsea the cat, an orange tabby with striped fur, long white "
               "whiskers and pale eyes.",
    "stereo_motorcycle": "A motorcycle standing in an indoor studio scene, photographed as the left "
                         "image of a stereo pair from the Middlebury 2014 stereo benchmark.",
    "coins": "A grayscale photo of ancient Greek coins from Pompeii, laid out in rows against a gray "
             "background.",
    "immunohistochemistry": "A microscope image of colonic glands: the FHL2 protein is stained brown with "
                            "DAB and the rest of the tissue is counterstained blue with hematoxylin.",
    "page": "A scanned page of printed text whose background is unevenly lit, darker on one side.",
    "moon": "A low-contrast grayscale photo of the surface of the moon, covered with craters.",
}
# Phrased differently from the calibration prompts (vlmptq.calib.BUILTIN_PROMPTS).
EVAL_QUESTIONS = (
    "What does this image show?",
    "Describe the picture in one sentence.",
    "What is the main subject here?",
    "Caption this photo.",
)


def holdout_photo(name: str) -> Image.Image:
    """Held-out photo ``name`` (a ``skimage.data`` function; ``stereo_motorcycle``: the left image)."""
    if name not in BUILTIN_HOLDOUT:
        raise ValueError(f"{name!r} is not a held-out photo; choose one of {BUILTIN_HOLDOUT}")
    import skimage.data

    arr = getattr(skimage.data, name)()
    if isinstance(arr, tuple):
        arr = arr[0]
    return Image.fromarray(arr).convert("RGB")


@dataclass
class KLSample:
    sample: CalibSample
    positions: torch.Tensor  # bool [T]: where the next-token distributions are compared


def kl_samples(processor, vision_token_ids: Collection[int], photos: Sequence[str] = BUILTIN_HOLDOUT,
               questions: Sequence[str] = EVAL_QUESTIONS) -> list[KLSample]:
    """One sample per (held-out photo, question), encoded like a calibration sample."""
    ids = check_vision_token_ids(vision_token_ids)
    config = CalibConfig(max_seq_len=1 << 16)
    out = []
    for name in photos:
        image = holdout_photo(name)
        for qi, question in enumerate(questions):
            rec = Record(f"holdout:{name}[{qi}]", (image,), HOLDOUT_CAPTIONS[name], question)
            out.append(compared_positions(encode_record(rec, processor, ids, config)))
    return out


def compared_positions(sample: CalibSample) -> KLSample:
    """``sample`` with its text positions after the last vision token marked for comparison."""
    last_vision = int(torch.nonzero(sample.vision_mask).max())
    after = torch.arange(sample.vision_mask.numel()) > last_vision
    return KLSample(sample, sample.text_mask & after)


def _logprobs(model: torch.nn.Module, ks: KLSample) -> torch.Tensor:
    from vlmptq.pipeline.capture import move_to, pixels_in

    device = next(model.parameters()).device
    inputs = pixels_in(move_to(ks.sample.inputs, device), model.dtype)
    logits = model(**inputs, use_cache=False).logits[0]  # [T, V]
    return torch.log_softmax(logits[ks.positions.to(device)].float(), dim=-1).cpu()  # [P, V]


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, samples: Sequence[KLSample], desc: str = "reference") -> list[torch.Tensor]:
    """The model's next-token log-probabilities (fp32, on the CPU) at each sample's positions, on
    the device the model is on."""
    return [_logprobs(model, ks) for ks in tqdm(samples, desc=desc, leave=False)]


def divergence(reference: Sequence[torch.Tensor], predicted: Sequence[torch.Tensor]) -> tuple[float, float, int]:
    """(mean KL(reference || predicted) in nats, fraction of equal argmaxes, positions) over all positions."""
    kl, same, count = 0.0, 0, 0
    for ref, lp in zip(reference, predicted, strict=True):
        kl += (ref.exp() * (ref - lp)).sum().item()
        same += int((ref.argmax(-1) == lp.argmax(-1)).sum())
        count += ref.shape[0]
    return kl / max(count, 1), same / max(count, 1), count


@torch.no_grad()
def mean_kl(model: torch.nn.Module, samples: Sequence[KLSample], reference: Sequence[torch.Tensor]) -> float:
    """Mean over all compared positions of KL(reference || model), in nats."""
    return divergence(reference, [_logprobs(model, ks) for ks in samples])[0]


def checkpoint_modules(model: torch.nn.Module, checkpoint: QuantizedCheckpoint) -> dict[str, str]:
    """The linears of ``model`` that ``checkpoint`` quantizes: module name -> on-disk name, after checking
    that each exists in the model with the checkpoint's shape (a checkpoint of another model fails here)."""
    from vlmptq.checkpoint.naming import module_disk_names

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    on_disk = {d: n for n, d in module_disk_names(model, linears, model.state_dict().keys()).items()}
    missing = sorted(set(checkpoint.layers) - set(on_disk))
    if missing:
        raise CheckpointError(f"{checkpoint.path} quantizes modules {missing[:3]} that the model does not have; "
                              f"is it a checkpoint of this model?")
    for disk, layout in checkpoint.layers.items():
        name = on_disk[disk]
        shape = (layout.out_features, layout.in_features)
        if tuple(linears[name].weight.shape) != shape:
            raise CheckpointError(f"{checkpoint.path}: {disk} is {shape}, the model's {name} "
                                  f"{tuple(linears[name].weight.shape)}; is it a checkpoint of this model?")
    return {on_disk[d]: d for d in checkpoint.layers}


def dequantize_into(model: torch.nn.Module, checkpoint: Path) -> torch.nn.Module:
    """Set every linear that ``checkpoint`` quantizes to its dequantized values (in the checkpoint's
    dtype, exactly what a server computes with), in place; returns ``model``. A quantized lm_head
    whose weight the model ties to the input embeddings is untied first (as the quantizer did)."""
    from vlmptq.checkpoint.reader import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        for name, disk in checkpoint_modules(model, ckpt).items():
            lin = model.get_submodule(name)
            if emb is not None and getattr(emb, "weight", None) is lin.weight:
                lin.weight = torch.nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
            lin.weight.copy_(ckpt.quantized_weight(disk).dequantize(torch.float32))
    return model
