"""One raw calibration sample (its images and video clips, caption, prompt) and the image decoding every source
shares."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from vlmptq.errors import CalibrationDataError

if TYPE_CHECKING:
    from vlmptq.calib.video import Video

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

SKIP_HINT = "or set on_bad_sample='skip' (--skip-bad-samples) to leave such samples out"


@dataclass(frozen=True)
class Record:
    """A decoded sample before it meets the processor: one image, several (multi-image records), video clips, or
    images and clips (at least one of them)."""

    sample_id: str
    images: tuple[Image.Image, ...]  # RGB, fully decoded, in the record's order
    text: str  # the assistant turn (caption / answer)
    prompt: str | None  # the user turn's text; None means the config's default prompt
    videos: tuple[Video, ...] = ()  # clips (vlmptq.calib.video), after the images in the user turn


def bad_sample(sample_id: str, problem: str, fix: str) -> CalibrationDataError:
    """The error for one unusable sample: which sample, what is wrong, how to fix it."""
    return CalibrationDataError(f"calibration sample {sample_id}: {problem}; {fix} ({SKIP_HINT}).")


def require_text(value: object, what: str, sample_id: str, fix: str) -> str:
    """``value`` as a non-empty string, or a bad-sample error naming ``what``."""
    if not isinstance(value, str) or not value.strip():
        raise bad_sample(sample_id, f"{what} is {_short(value)}, not a non-empty string", fix)
    return value.strip()


def local_image_path(value: str, base: Path | None, sample_id: str) -> Path:
    """The file an image reference names (relative ones under ``base``); a URL is refused: calibration reads
    local files only (no network at run time)."""
    if value.strip().lower().startswith(("http://", "https://", "s3://", "gs://")):
        raise bad_sample(sample_id, f"names its image by URL ({value.strip()[:80]})", "download the images first "
                         "(e.g. with img2dataset) and give their local paths")
    path = Path(value).expanduser()
    return base / path if base is not None and not path.is_absolute() else path


def load_image_file(path: Path, sample_id: str) -> Image.Image:
    """Decode the image file at ``path`` to RGB, with errors that name the sample."""
    if not path.is_file():
        raise bad_sample(sample_id, f"image file {str(path)!r} does not exist",
                         "correct the path or add the file")
    return _decode(path, sample_id, f"image file {str(path)!r}", "replace it with a readable image (it may be "
                   "truncated or not an image)")


def load_image_bytes(data: bytes, sample_id: str) -> Image.Image:
    """Decode an encoded image held in memory (e.g. a datasets ``Image`` cell) to RGB."""
    return _decode(io.BytesIO(data), sample_id, "the image bytes", "replace the image in the dataset with a readable "
                   "one")


def _decode(source: Path | io.BytesIO, sample_id: str, what: str, fix: str) -> Image.Image:
    try:
        with Image.open(source) as img:
            return to_rgb(img)
    except Image.DecompressionBombError as err:  # PIL refuses images over 2 x MAX_IMAGE_PIXELS before decoding
        raise bad_sample(sample_id, f"{what} is too large to decode safely ({err})", "downscale the file (or, "
                         "trusting it, raise PIL.Image.MAX_IMAGE_PIXELS in Python)") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise bad_sample(sample_id, f"cannot decode {what} ({err})", fix) from err


def to_rgb(img: Image.Image) -> Image.Image:
    """Fully decode ``img``, apply its EXIF orientation and return it as RGB.

    Transparent images are flattened onto white: dropping alpha would expose whatever colour the
    encoder left under transparent pixels (often black).
    """
    img.load()  # truncated files fail here rather than later inside the processor
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def limit_side(img: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale ``img`` (keeping its aspect ratio) so its long side is at most ``max_side``."""
    if max_side is None or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
