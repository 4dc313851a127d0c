"""What calibration data to load and how: a validated, immutable config."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vlmptq.errors import ConfigError

DEFAULT_PROMPT = "Describe this image."
DEFAULT_TEXT_COLUMN = "text"
DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_VIDEO_COLUMN = "video"
BAD_SAMPLE_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class CalibConfig:
    """Where the calibration image-text pairs come from and how many to take.

    Every field is checked at construction; an invalid value raises ``ConfigError`` naming the
    field, the value and the fix. See docs/calibration.md for the accepted sources.
    """

    # "builtin", a directory of images + captions, a .jsonl / .json file, or a Hugging Face dataset
    # (hub name, local dataset directory, or a directory written by Dataset.save_to_disk).
    source: str = "builtin"
    num_samples: int = 128  # pairs to return; fewer if the source has fewer (logged)
    max_seq_len: int = 2048  # tokens per sample (text + vision placeholders); longer ones are bad
    seed: int = 0  # which samples are drawn (and the built-in set's crops/flips/prompts)
    split: str = "train"  # Hugging Face datasets only
    image_column: str = DEFAULT_IMAGE_COLUMN  # HF dataset column / jsonl key: the image (path), or a list of them
    text_column: str = DEFAULT_TEXT_COLUMN  # the caption or answer: the assistant turn
    prompt_column: str | None = None  # the question (user turn); None: a "prompt" field or default
    on_bad_sample: str = "error"  # "error": raise on the first bad sample; "skip": log it and go on
    default_prompt: str = DEFAULT_PROMPT  # user turn for samples without their own prompt
    max_image_side: int | None = None  # downscale images with a longer side (None: keep size)
    image_root: str | None = None  # relative image paths of a .jsonl/.json file or dataset start here
    video_column: str = DEFAULT_VIDEO_COLUMN  # jsonl key / dataset column: a video clip (frame folder or frame list)
    video_frames: int = 8  # at most this many frames per clip (evenly subsampled)
    video_fps: float = 2.0  # the frame rate of a clip's frames when its record gives no "fps"

    def __post_init__(self) -> None:
        for field in ("source", "image_root"):
            if isinstance(getattr(self, field), os.PathLike):
                object.__setattr__(self, field, os.fspath(getattr(self, field)))
        _check_str(self, "source", 'use "builtin", a directory, a .jsonl file or a dataset name')
        _check_int(self, "num_samples", 1, "the paper calibrates on 128 image-caption pairs")
        _check_int(self, "max_seq_len", 16, "it bounds the tokens of one sample, e.g. 2048")
        _check_int(self, "seed", None, "any integer selects a reproducible subset")
        _check_str(self, "split", 'name a split of the dataset, e.g. "train"')
        _check_str(self, "image_column", "name the column or key that holds the image")
        _check_str(self, "text_column", "name the column or key that holds the caption")
        if self.prompt_column is not None:
            _check_str(self, "prompt_column", "name the column holding the question, or pass None")
        _check_str(self, "default_prompt", 'give the instruction to pair with each image, e.g. '
                   f'"{DEFAULT_PROMPT}"')
        if self.on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ConfigError(
                f"on_bad_sample={self.on_bad_sample!r} is not a policy; use 'error' (stop at the "
                "first bad sample) or 'skip' (log each bad sample, leave it out and go on)."
            )
        if self.image_root is not None:
            _check_str(self, "image_root", "name the folder the records' relative image paths start from")
        if self.max_image_side is not None:
            _check_int(self, "max_image_side", 28, "or None to keep images at their size")
        _check_str(self, "video_column", "name the column or key that holds a video clip's frames")
        _check_int(self, "video_frames", 1, "the frames kept per clip, e.g. 8")
        if isinstance(self.video_fps, bool) or not isinstance(self.video_fps, (int, float)) or not self.video_fps > 0:
            raise ConfigError(f"video_fps={self.video_fps!r} must be a positive number (the frames' rate, e.g. 2).")


def _check_str(cfg: CalibConfig, field: str, fix: str) -> None:
    value = getattr(cfg, field)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field}={value!r} must be a non-empty string; {fix}.")


def _check_int(cfg: CalibConfig, field: str, minimum: int | None, hint: str) -> None:
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{field}={value!r} must be an integer ({hint}).")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{field}={value!r} is too small; use at least {minimum} ({hint}).")
