"""Video clips of calibration samples: frames read from files, subsampled, with the frame rate they stand for.

A record names a clip as an encoded video file (``"video": "clips/0001.mp4"``, decoded with PyAV, the ``video``
extra; its own frame rate), a folder of frame images (``"video": "clips/0001/"``, frames in natural order, as
``ffmpeg -i clip.mp4 -vf fps=2 clips/0001/%04d.jpg`` writes them) or a list of frame files; for frames, optionally
their rate (``"fps"``, default ``CalibConfig.video_fps``). A clip longer than ``CalibConfig.video_frames`` frames is
subsampled uniformly (a file: only those frames are kept while decoding), its rate scaled to match, so the model's
processor places and times the frames as at inference (Qwen2.5-VL's ``second_per_grid_ts``, Qwen3-VL's
timestamps).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlmptq.calib.records import IMAGE_SUFFIXES, bad_sample, load_image_file, local_image_path

VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpeg", ".mpg", ".flv", ".gif"})


@dataclass(frozen=True)
class Video:
    """One clip as the processor gets it."""

    frames: tuple[Image.Image, ...]  # RGB, in time order
    fps: float  # frames per second of ``frames`` (after subsampling)


def load_video(value: object, fps: object, base: Path | None, sample_id: str, max_frames: int,
               default_fps: float) -> Video:
    """The clip a record's video cell names (a video file, a frame folder or a list of frame files), at most
    ``max_frames`` frames of it."""
    if isinstance(value, str) and value.strip():
        path = local_image_path(value, base, sample_id)
        if path.suffix.lower() in VIDEO_SUFFIXES and not path.is_dir():
            return _decode(path, sample_id, max_frames)
    paths = _frame_paths(value, base, sample_id)
    rate = _fps(fps, default_fps, sample_id)
    keep = _uniform(len(paths), max_frames)
    frames = tuple(load_image_file(paths[i], sample_id) for i in keep)
    return Video(frames, rate * len(keep) / len(paths))


def _frame_paths(value: object, base: Path | None, sample_id: str) -> list[Path]:
    fix = 'give a folder of frame images ("video": "clips/0001/") or a list of frame files'
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise bad_sample(sample_id, f"its video is {value!r:.80}, not a non-empty list of frame paths", fix)
        return [local_image_path(v, base, sample_id) for v in value]
    if not isinstance(value, str) or not value.strip():
        raise bad_sample(sample_id, f"its video is {value!r:.80}, not a path", fix)
    path = local_image_path(value, base, sample_id)
    if not path.is_dir():
        raise bad_sample(sample_id, f"its video folder {str(path)!r} does not exist", fix)
    frames = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
                    key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    if not frames:
        raise bad_sample(sample_id, f"its video folder {str(path)!r} holds no frame images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))})", fix)
    return frames


def _decode(path: Path, sample_id: str, max_frames: int) -> Video:
    """``max_frames`` evenly spread frames of the video file at ``path`` (decoded in one pass, keeping only those)
    and their rate, from the file's own."""
    if not path.is_file():
        raise bad_sample(sample_id, f"its video file {str(path)!r} does not exist", "correct the path or add the file")
    try:
        import av
    except ImportError:
        raise bad_sample(sample_id, f"its video {str(path)!r} is an encoded file and PyAV is not installed",
                         f"pip install 'vlmptq[video]' (PyAV), or extract its frames: ffmpeg -i {path.name} -vf fps=2 "
                         "frames/%04d.jpg, and give the folder with \"fps\": 2") from None
    fix = "replace the file (it may be truncated), or give its frames as a folder"
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise bad_sample(sample_id, f"{str(path)!r} holds no video stream", fix)
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.base_rate or 0)
            total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
            if not total or not rate:
                raise bad_sample(sample_id, f"{str(path)!r} gives no frame count or rate", fix)
            container.seek(0)
            keep = set(_uniform(total, max_frames))
            frames = []
            for i, frame in enumerate(container.decode(stream)):
                if i in keep:
                    frames.append(frame.to_image().convert("RGB"))
                if len(frames) == len(keep):
                    break
    except av.error.FFmpegError as err:
        raise bad_sample(sample_id, f"cannot decode the video {str(path)!r} ({err})", fix) from err
    if not frames:
        raise bad_sample(sample_id, f"the video {str(path)!r} decodes to no frames", fix)
    return Video(tuple(frames), rate * len(frames) / total)


def _fps(value: object, default: float, sample_id: str) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise bad_sample(sample_id, f"its fps is {value!r:.40}, not a positive number", "give the frames' rate")
    return float(value)


def _uniform(n: int, k: int) -> list[int]:
    """``min(n, k)`` frame indices spread evenly over ``0 .. n-1``, first and last included."""
    if n <= k:
        return list(range(n))
    return [round(i * (n - 1) / (k - 1)) for i in range(k)] if k > 1 else [0]
