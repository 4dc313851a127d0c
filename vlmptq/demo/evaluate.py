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

import torch
from PIL import Image

from vlmptq.calib import BUILTIN_HOLDOUT, CalibConfig, CalibSample
from vlmptq.calib.encode import check_vision_token_ids, encode_record
from vlmptq.calib.records import Record

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
            rec = Record(f"holdout:{name}[{qi}]", image, HOLDOUT_CAPTIONS[name], question)
            s = encode_record(rec, processor, ids, config)
            last_vision = int(torch.nonzero(s.vision_mask).max())
            after = torch.arange(s.vision_mask.numel()) > last_vision
            out.append(KLSample(s, s.text_mask & after))
    return out


def _logprobs(model: torch.nn.Module, ks: KLSample) -> torch.Tensor:
    logits = model(**ks.sample.inputs, use_cache=False).logits[0]  # [T, V]
    return torch.log_softmax(logits[ks.positions].float(), dim=-1)  # [P, V]


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, samples: Sequence[KLSample]) -> list[torch.Tensor]:
    """The unquantized model's next-token log-probabilities at each sample's positions."""
    return [_logprobs(model, ks) for ks in samples]


@torch.no_grad()
def mean_kl(model: torch.nn.Module, samples: Sequence[KLSample], reference: Sequence[torch.Tensor]) -> float:
    """Mean over all compared positions of KL(reference || model), in nats."""
    total, count = 0.0, 0
    for ks, ref in zip(samples, reference, strict=True):
        lp = _logprobs(model, ks)
        total += (ref.exp() * (ref - lp)).sum().item()
        count += ref.shape[0]
    return total / max(count, 1)


def dequantize_into(model: torch.nn.Module, checkpoint: Path) -> torch.nn.Module:
    """Set every linear that ``checkpoint`` quantizes to its dequantized values (in the checkpoint's
    dtype, exactly what a server computes with), in place; returns ``model``."""
    from vlmptq.checkpoint.naming import module_disk_names
    from vlmptq.checkpoint.reader import open_checkpoint

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    on_disk = {d: n for n, d in module_disk_names(model, linears, model.state_dict().keys()).items()}
    ckpt = open_checkpoint(checkpoint)
    missing = sorted(set(ckpt.layers) - set(on_disk))
    if missing:
        raise RuntimeError(f"{checkpoint} quantizes modules {missing[:3]} that the model does not have")
    with torch.no_grad():
        for name in ckpt.layers:
            linears[on_disk[name]].weight.copy_(ckpt.quantized_weight(name).dequantize(torch.float32))
    return model
