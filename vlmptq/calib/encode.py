"""Turn one image-text pair into model inputs plus the per-token modality masks.

Each pair becomes a two-turn chat in the Hugging Face message format that Qwen2-VL, Qwen2.5-VL,
LLaVA, Idefics3 and InternVL processors all share: the user turn holds the image and the prompt, the
assistant turn the caption. The processor's chat template writes the model's own image placeholder
tokens, and the processor expands them to one token per vision feature; the vision mask marks those
positions.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from vlmptq.calib.config import CalibConfig
from vlmptq.calib.records import Record, bad_sample, limit_side
from vlmptq.errors import ConfigError


@dataclass
class CalibSample:
    """One calibration sample, ready for ``model(**sample.inputs)``."""

    inputs: dict[str, torch.Tensor]  # processor output for this sample alone (batch dim 1)
    vision_mask: torch.Tensor  # bool [T]: image/video placeholder tokens (vision features go here)
    text_mask: torch.Tensor  # bool [T]: real tokens that are not vision (attention 1, not vision)
    sample_id: str  # where it came from, e.g. "photos/cat.jpg" or "dataset[17]"

    @property
    def num_tokens(self) -> int:
        return int(self.vision_mask.numel())


def chat_messages(prompt: str, caption: str, images: int = 1, videos: int = 0) -> list[dict]:
    """user: [image x ``images``, video x ``videos``, prompt]; assistant: caption (the HF multimodal chat format)."""
    media = [*[{"type": "image"}] * images, *[{"type": "video"}] * videos]
    return [
        {"role": "user", "content": [*media, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]


def check_vision_token_ids(vision_token_ids: Collection[int]) -> torch.Tensor:
    """The ids as a 1-D int64 tensor, after checking there is at least one and all are ints."""
    ids = list(vision_token_ids)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(
            f"vision_token_ids={vision_token_ids!r} must be a non-empty collection of token ids; "
            "pass the model's image (and video) placeholder ids, e.g. config.image_token_id.")
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


def encode_record(record: Record, processor, vision_ids: torch.Tensor,
                  config: CalibConfig) -> CalibSample:
    """Format, tokenize and mask one record; raise a bad-sample error if it is too long."""
    sid = record.sample_id
    prompt = record.prompt or config.default_prompt
    try:
        text = processor.apply_chat_template(chat_messages(prompt, record.text, len(record.images),
                                                           len(record.videos)),
                                             tokenize=False, add_generation_prompt=False)
    except ValueError as err:  # e.g. "this processor does not have a chat template"
        raise ConfigError(
            f"the processor could not format calibration sample {sid} as a chat ({err}); load the "
            "processor of an instruction-tuned VLM (one with a chat template).") from err
    images = [limit_side(image, config.max_image_side) for image in record.images]
    media = {}
    if images:  # several images of one sample: a nested list, the batch's one entry (every processor takes that form)
        media["images"] = images if len(images) == 1 else [images]
    if record.videos:
        media.update(_video_inputs(record, config))
    try:
        batch = processor(text=[text], return_tensors="pt", **media)
    except TypeError as err:  # a processor without videos refuses their arguments; anything else is not ours to name
        if not record.videos:
            raise
        raise _no_video_support(processor, err) from err
    except ValueError as err:  # processors reject e.g. extreme aspect ratios this way
        if record.videos and not images:
            raise bad_sample(sid, f"the processor rejected its video ({err})", "replace the clip's frames") from err
        sizes = ", ".join(f"{i.width}x{i.height}" for i in images)
        raise bad_sample(sid, f"the processor rejected it ({err})",
                         f"replace the image{'s' if len(images) > 1 else ''} ({sizes} px)") from err
    if record.videos:
        _check_videos_placed(processor, batch, sid)
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    input_ids = inputs.get("input_ids")
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ConfigError(f"the processor returned input_ids of shape "
                          f"{None if input_ids is None else tuple(input_ids.shape)} for sample "
                          f"{sid}; expected [1, T]. Is it a vision-language processor?")
    ids = input_ids[0]  # [T]
    vision_mask = torch.isin(ids, vision_ids)  # [T]
    if not bool(vision_mask.any()):
        raise ConfigError(
            f"sample {sid} has no token among vision_token_ids={vision_ids.tolist()} after "
            "processing; pass the ids of the model's image placeholder tokens (for Qwen2-VL "
            "config.image_token_id and config.video_token_id).")
    attention = inputs.get("attention_mask")
    real = attention[0].bool() if attention is not None else torch.ones_like(vision_mask)
    text_mask = real & ~vision_mask  # [T]
    if ids.numel() > config.max_seq_len:
        raise bad_sample(
            sid, f"has {ids.numel()} tokens ({int(vision_mask.sum())} of them vision), more "
            f"than max_seq_len={config.max_seq_len}",
            "raise max_seq_len, shorten the caption, or shrink the image (max_image_side=448, or "
            "the processor's max_pixels)" + (f"; its {len(record.images)} images: fewer per sample"
                                              if len(record.images) > 1 else "")
            + (f"; its clip: fewer frames (video_frames={config.video_frames})" if record.videos else ""))
    return CalibSample(inputs=inputs, vision_mask=vision_mask, text_mask=text_mask, sample_id=sid)


def _video_inputs(record: Record, config: CalibConfig) -> dict:
    """The processor's video arguments: each clip's frames as they are (no resampling: ``do_sample_frames=False``)
    with the metadata the Qwen-VL processors time them by."""
    from transformers.video_utils import VideoMetadata

    clips = [[limit_side(f, config.max_image_side) for f in v.frames] for v in record.videos]
    meta = [VideoMetadata(total_num_frames=len(c), fps=v.fps, duration=len(c) / v.fps, frames_indices=list(
        range(len(c))), width=c[0].width, height=c[0].height) for c, v in zip(clips, record.videos)]
    return {"videos": clips, "video_metadata": meta, "do_sample_frames": False}


def _no_video_support(processor, err: Exception) -> ConfigError:
    return ConfigError(
        f"the model's processor ({type(processor).__name__}) does not take video clips ({err}); calibrate it on "
        "images (a clip's frames can be given as a multi-image sample, \"images\": [...]).")


def _check_videos_placed(processor, batch, sid: str) -> None:
    """A clip must come out as placeholder tokens in the chat plus tensors laid out as vlmptq's video calibration is
    tested with: the Qwen-VL family's patches with ``video_grid_thw``, or LLaVA-OneVision's frames
    ``[videos, frames, 3, H, W]``. A processor whose chat template places no video, or that lays videos out
    otherwise (Gemma 4's, whose model in transformers 5.19 does not take the frame counts its processor returns), is
    refused before any weight is read, not deep inside the calibration forward."""
    video_id = getattr(processor, "video_token_id", None)
    placed = video_id is not None and bool((batch["input_ids"] == video_id).any())
    frames = batch.get("pixel_values_videos")
    tested = "video_grid_thw" in batch or (isinstance(frames, torch.Tensor) and frames.dim() == 5)
    if not placed or not tested:
        why = (f"lays videos out in a way vlmptq has not tested (it returns {', '.join(sorted(batch))})"
               if placed else "placed no video token in the chat (its chat template takes no videos, or its processor "
               "writes a clip as image placeholders, as GLM-4.1V's does)")
        raise ConfigError(
            f"calibration sample {sid}: the model's processor ({type(processor).__name__}) {why}; vlmptq calibrates on "
            "videos of the Qwen-VL family and LLaVA-OneVision. Give the clip's frames as a multi-image sample "
            "(\"images\": [...]) instead.")
