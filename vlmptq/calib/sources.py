"""Calibration sources: an image directory, a .jsonl / .json file, a Hugging Face dataset, the built-in set.

A source is an indexable list of candidate samples. ``record(i)`` decodes candidate ``i`` and raises
``CalibrationDataError`` (naming the sample) when it is unusable, so the loader can apply the
error/skip policy one sample at a time. Opening a source only lists candidates; images are decoded
when a candidate is drawn.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlmptq.calib.config import DEFAULT_IMAGE_COLUMN, DEFAULT_TEXT_COLUMN, CalibConfig
from vlmptq.calib.records import (
    IMAGE_SUFFIXES, Record, bad_sample, load_image_bytes, load_image_file, local_image_path, require_text, to_rgb,
)
from vlmptq.calib.video import load_video
from vlmptq.errors import CalibrationDataError

log = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.jsonl"
ACCEPTED_FORMS = (
    '"builtin" (the bundled photo set); a directory of images with same-named .txt captions '
    f"and/or a {CAPTIONS_FILE}; a .jsonl file with one {{\"image\": ..., \"text\": ...}} object "
    "per line, or a .json file holding a list of them (LLaVA / ShareGPT4V \"conversations\" records "
    "too); or a Hugging Face dataset (hub name, local dataset directory, or a directory written by "
    "Dataset.save_to_disk)"
)
# LLaVA / ShareGPT4V records: {"image": "coco/train2017/x.jpg", "conversations": [{"from": "human",
# "value": "<image>\nDescribe..."}, {"from": "gpt", "value": "A caption."}, ...]}
CONVERSATION_KEY = "conversations"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
IMAGE_PLACEHOLDER = "<image>"


class Source(ABC):
    """Candidates ``0 .. len-1``; ``ordered`` sources are already in a seeded order."""

    label: str
    ordered: bool = False

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def record(self, index: int) -> Record:
        """Decode candidate ``index``; raise ``CalibrationDataError`` if it is unusable."""


def open_source(config: CalibConfig) -> Source:
    """The source ``config.source`` names (see ``ACCEPTED_FORMS``)."""
    if config.source == "builtin":
        from vlmptq.calib.builtin import BuiltinSource

        return BuiltinSource(config)
    path = Path(config.source).expanduser()
    if path.is_file():
        if path.suffix.lower() in (".jsonl", ".json"):
            return JsonlSource(path, config)
        raise CalibrationDataError(
            f"calibration source {config.source!r} is a file but not a .jsonl or .json file; accepted "
            f"sources: {ACCEPTED_FORMS}."
        )
    if path.is_dir():
        if not any(not p.name.startswith(".") for p in path.iterdir()):
            raise CalibrationDataError(
                f"calibration source {config.source!r} is an empty directory; put images with "
                f"same-named .txt captions (or a {CAPTIONS_FILE}) in it, or choose another source.")
        if is_dataset_folder(path) or not _has_images_or_captions(path):
            return HFDatasetSource(config)
        return DirectorySource(path, config)
    if config.source.endswith((".jsonl", ".json")) or config.source.startswith(("/", "./", "../", "~")):
        raise CalibrationDataError(
            f"calibration source {config.source!r} does not exist; check the path (accepted "
            f"sources: {ACCEPTED_FORMS})."
        )
    return HFDatasetSource(config)


# ---------------------------------------------------------------- fields shared by jsonl / datasets


def row_fields(row: Mapping, config: CalibConfig, sample_id: str, where: str
               ) -> tuple[list, str, str | None]:
    """(image values, caption, prompt or None) from one jsonl object / dataset row: the ``image_column`` holds one
    image or a list of them (a multi-image sample; with the default column, an ``images`` key is read too), and may
    be absent (or null) in a row with a video clip (``video_column``). A row without ``text_column`` but with
    LLaVA-style ``conversations`` takes its first user -> assistant exchange (unless ``text_column`` was named: a
    misspelt column is an error, not a silent switch of source)."""
    conversational = reads_conversations(config, row)
    column = image_key(config, row)
    has_video = row.get(config.video_column) is not None
    if row.get(column) is None and not has_video:
        if conversational:
            raise bad_sample(sample_id, f"is a text-only conversation (no {config.image_column!r} key)",
                             "calibration needs an image per sample; leave such records out")
        raise bad_sample(sample_id, f"has no {config.image_column!r} key (its keys: {sorted(row)})",
                         f"add {config.image_column!r} (or a {config.video_column!r} clip) to {where}, or set "
                         "image_column= to the key that holds it")
    if conversational:
        text, prompt = conversation_fields(row[CONVERSATION_KEY], sample_id)
    else:
        if config.text_column not in row:
            raise bad_sample(sample_id, f"has no {config.text_column!r} key (its keys: {sorted(row)})",
                             f"add {config.text_column!r} to {where} or set text_column= to the key that holds it"
                             + (f" (or leave text_column at {DEFAULT_TEXT_COLUMN!r} to use its LLaVA "
                                f"{CONVERSATION_KEY!r})" if CONVERSATION_KEY in row else ""))
        caption = row[config.text_column]
        if isinstance(caption, (list, tuple)) and caption:  # e.g. COCO's five captions: take the first
            caption = caption[0]
        text = require_text(caption, f"the caption {config.text_column!r}", sample_id,
                            f"give every sample a caption in {where}")
        value = row.get("prompt")
        prompt = value.strip() if isinstance(value, str) and value.strip() else None
    if config.prompt_column is not None:
        if config.prompt_column not in row:
            raise bad_sample(sample_id, f"has no {config.prompt_column!r} key (its keys: "
                             f"{sorted(row)})", "add it or set prompt_column=None to use the "
                             "default prompt")
        prompt = require_text(row[config.prompt_column], f"the prompt {config.prompt_column!r}",
                              sample_id, f"give every sample a prompt in {where}")
    return (image_values(row[column], column, sample_id) if row.get(column) is not None else []), text, prompt


def image_key(config: CalibConfig, keys) -> str:
    """The key holding a row's images: ``image_column``, or ``images`` when that is left at its default and absent
    (LLaVA-OneVision's and most multi-image records)."""
    if config.image_column == DEFAULT_IMAGE_COLUMN and config.image_column not in keys and "images" in keys:
        return "images"
    return config.image_column


def image_values(value: object, column: str, sample_id: str) -> list:
    """A row's image cell as a list: one image, or a multi-image sample's images in order."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise bad_sample(sample_id, f"{column!r} is an empty list", "give it at least one image")
        return list(value)
    return [value]


def reads_conversations(config: CalibConfig, keys) -> bool:
    """Whether records / a dataset with these keys are read as LLaVA ``conversations``: only when the
    caption key was left at its default and is absent."""
    return (CONVERSATION_KEY in keys and config.text_column not in keys
            and config.text_column == DEFAULT_TEXT_COLUMN)


def conversation_fields(turns: object, sample_id: str) -> tuple[str, str | None]:
    """(caption, prompt or None) from the first user turn followed by an assistant turn of a
    LLaVA / ShareGPT4V conversation (``from``/``value``, or ``role``/``content`` with string content).
    The ``<image>`` placeholder is removed from the prompt: the chat template places the image.
    Later exchanges are not used (one image-text pair per record)."""
    fix = ('write "conversations" as [{"from": "human", "value": "<image>\\n..."}, '
           '{"from": "gpt", "value": "..."}]')
    if not isinstance(turns, (list, tuple)) or not turns:
        raise bad_sample(sample_id, f"{CONVERSATION_KEY!r} is {turns!r:.60}, not a list of turns", fix)
    parsed = []
    for turn in turns:
        role = turn.get("from", turn.get("role")) if isinstance(turn, Mapping) else None
        value = turn.get("value", turn.get("content")) if isinstance(turn, Mapping) else None
        if not isinstance(role, str) or not isinstance(value, str):
            raise bad_sample(sample_id, f"has a turn {turn!r:.80} without a string 'from' and 'value'", fix)
        parsed.append((role.lower(), value))
    for (role, value), (next_role, answer) in zip(parsed, parsed[1:]):
        if role in USER_ROLES and next_role in ASSISTANT_ROLES:
            caption = require_text(answer, "the first assistant turn", sample_id, "give it a non-empty answer")
            prompt = value.replace(IMAGE_PLACEHOLDER, "").strip()
            return caption, prompt or None
    roles = [r for r, _ in parsed]
    raise bad_sample(sample_id, f"has no user turn followed by an assistant turn (roles: {roles})", fix)


def parse_records(path: Path) -> list[tuple[str, dict | CalibrationDataError]]:
    """``(sample id, object or the error for it)`` per record of ``path``: each non-blank line of a
    .jsonl file (ids ``file.jsonl:LINE``), each element of a .json file's list (``file.json[i]``)."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CalibrationDataError(f"cannot read {str(path)!r} ({err}); it must be a UTF-8 text "
                                   "file of JSON records.") from err
    if path.suffix.lower() == ".json":
        return _parse_json_list(path, content)
    out: list[tuple[str, dict | CalibrationDataError]] = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        sample_id = f"{path.name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            out.append((sample_id, bad_sample(sample_id, f"is not valid JSON ({err})",
                                              "write one JSON object per line")))
            continue
        out.append((sample_id, _object_or_error(obj, sample_id)))
    return out


def _parse_json_list(path: Path, content: str) -> list[tuple[str, dict | CalibrationDataError]]:
    try:
        data = json.loads(content)
    except json.JSONDecodeError as err:
        raise CalibrationDataError(f"{str(path)!r} is not valid JSON ({err}); a .json calibration file "
                                   "holds one list of records (use .jsonl for one record per line).") from err
    if not isinstance(data, list):
        raise CalibrationDataError(f"{str(path)!r} holds a JSON {type(data).__name__}, not a list of records; "
                                   'write [{"image": ..., "text": ...}, ...] (or LLaVA "conversations" records).')
    return [(f"{path.name}[{i}]", _object_or_error(obj, f"{path.name}[{i}]")) for i, obj in enumerate(data)]


def _object_or_error(obj: object, sample_id: str) -> dict | CalibrationDataError:
    if isinstance(obj, dict):
        return obj
    return bad_sample(sample_id, f"is a JSON {type(obj).__name__}, not an object",
                      'write objects such as {"image": "cat.jpg", "text": "A cat."}')


# ------------------------------------------------------------------------------- image directory


@dataclass(frozen=True)
class _DirItem:
    sample_id: str
    image_path: Path
    row: dict | None = None  # its captions.jsonl entry, if any
    error: CalibrationDataError | None = None  # a captions.jsonl line that could not be parsed


class DirectorySource(Source):
    """Images anywhere under ``root``, each captioned by a same-named ``.txt`` file or by an entry
    of ``root/captions.jsonl`` (which wins, and may add a prompt or list images by path)."""

    def __init__(self, root: Path, config: CalibConfig) -> None:
        self.root, self.config, self.label = root, config, root.name or str(root)
        images = sorted(_image_files(root), key=lambda p: p.relative_to(root).as_posix())
        entries: dict[Path, dict] = {}
        items: list[_DirItem] = []
        captions = root / CAPTIONS_FILE
        if captions.is_file():
            for sid, row in parse_records(captions):
                if isinstance(row, CalibrationDataError):
                    items.append(_DirItem(sid, captions, error=row))
                    continue
                image = row.get(config.image_column)
                if not isinstance(image, str) or not image.strip():
                    items.append(_DirItem(sid, captions, error=bad_sample(
                        sid, f"has no image path under {config.image_column!r}",
                        f"give each line of {CAPTIONS_FILE} the image's path relative to the "
                        "directory")))
                    continue
                entries[(root / Path(image).expanduser()).resolve()] = row
        listed = set()
        for path in images:
            key = path.resolve()
            listed.add(key)
            items.append(_DirItem(path.relative_to(root).as_posix(), path, entries.get(key)))
        for key, row in entries.items():  # listed in captions.jsonl but not found on disk
            if key not in listed:
                items.append(_DirItem(_rel(key, root), key, row))
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def record(self, index: int) -> Record:
        item = self.items[index]
        if item.error is not None:
            raise item.error
        if item.row is not None:
            _, text, prompt = row_fields(item.row, self.config, item.sample_id, CAPTIONS_FILE)
        else:
            text, prompt = self._txt_caption(item), None
        image = load_image_file(item.image_path, item.sample_id)
        return Record(item.sample_id, (image,), text, prompt)

    def _txt_caption(self, item: _DirItem) -> str:
        txt = item.image_path.with_suffix(".txt")
        if not txt.is_file():
            raise bad_sample(item.sample_id, "has no caption",
                             f"write it to {_rel(txt, self.root)!r} or add an entry for the image "
                             f"to {CAPTIONS_FILE}")
        try:
            content = txt.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise bad_sample(item.sample_id, f"cannot read caption file {_rel(txt, self.root)!r} "
                             f"({err})", "save it as UTF-8 text") from err
        return require_text(content, f"caption file {_rel(txt, self.root)!r}", item.sample_id,
                            "write the caption into it")


def _image_files(root: Path):
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if (path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
                and not any(part.startswith(".") for part in rel.parts)):
            yield path


def _has_images_or_captions(root: Path) -> bool:
    return (root / CAPTIONS_FILE).is_file() or next(_image_files(root), None) is not None


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------- .jsonl file


class JsonlSource(Source):
    """Records ``{"image": path, "text": caption, "prompt": optional}`` (or LLaVA ``conversations``),
    one per line (.jsonl) or as one list (.json); relative image paths are resolved against
    ``image_root`` (default: the file's directory)."""

    def __init__(self, path: Path, config: CalibConfig) -> None:
        self.path, self.config, self.label = path, config, path.name
        self.image_root = image_root(config, path.parent)
        self.items = parse_records(path)

    def __len__(self) -> int:
        return len(self.items)

    def record(self, index: int) -> Record:
        sample_id, row = self.items[index]
        if isinstance(row, CalibrationDataError):
            raise row
        images, text, prompt = row_fields(row, self.config, sample_id, self.path.name)
        for image in images:
            if not isinstance(image, str) or not image.strip():
                raise bad_sample(sample_id, f"{image_key(self.config, row)!r} holds {image!r}, not a path",
                                 "give each image's path (relative to image_root / the file's folder, or absolute)")
        media = [*images, *([_clip_label(row[self.config.video_column])] if self.config.video_column in row else [])]
        sample_id = f"{sample_id} ({media[0]}{f' +{len(media) - 1}' if len(media) > 1 else ''})"
        return Record(sample_id, tuple(load_image_file(local_image_path(image, self.image_root, sample_id), sample_id)
                                       for image in images), text, prompt,
                      videos=_videos(row, self.config, self.image_root, sample_id))


def _clip_label(value: object) -> str:
    return value if isinstance(value, str) else f"{len(value)} frames" if isinstance(value, (list, tuple)) else "?"


def _videos(row: Mapping, config: CalibConfig, base: Path | None, sample_id: str) -> tuple:
    """The record's video clip (``video_column``, with its ``fps``), if it has one."""
    value = row.get(config.video_column)
    if value is None:
        return ()
    return (load_video(value, row.get("fps"), base, sample_id, config.video_frames, config.video_fps),)


def image_root(config: CalibConfig, default: Path | None) -> Path | None:
    """Where relative image paths point: ``config.image_root`` (checked) or ``default``."""
    if config.image_root is None:
        return default
    root = Path(config.image_root).expanduser()
    if not root.is_dir():
        raise CalibrationDataError(f"image_root {config.image_root!r} is not a directory; give the folder "
                                   "that the records' relative image paths start from.")
    return root


# ------------------------------------------------------------------------- Hugging Face datasets


def _is_image_folder_dataset(path: Path) -> bool:
    """A Hugging Face ``imagefolder`` directory: images plus a metadata.jsonl/csv/parquet file."""
    return not (path / CAPTIONS_FILE).is_file() and any(
        (path / f"metadata.{ext}").is_file() for ext in ("jsonl", "csv", "parquet"))


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def is_dataset_folder(path: Path) -> bool:
    """A ``save_to_disk`` directory or an ``imagefolder`` dataset (images plus a metadata file)."""
    return _is_saved_dataset(path) or _is_image_folder_dataset(path)


def load_hf_dataset(config: CalibConfig, accepted: str = ACCEPTED_FORMS):
    """``config.source`` as a map-style ``datasets.Dataset`` (its ``split``): ``load_from_disk`` for a
    directory written by ``save_to_disk``, else ``load_dataset`` (hub name or local dataset folder).
    ``accepted``: the sources the caller takes, named when loading fails."""
    import datasets

    path = Path(config.source).expanduser()
    try:
        if path.is_dir() and _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(config.source, split=config.split)
    except Exception as err:  # datasets raises many types; the boundary turns them into one
        raise CalibrationDataError(
            f"cannot load calibration source {config.source!r} as a Hugging Face dataset "
            f"({_root_cause(err)}).{_folder_hint(path)} Accepted sources: {accepted}. Without "
            "network access a hub dataset must already be in the local cache."
        ) from err
    if isinstance(ds, datasets.DatasetDict):
        if config.split not in ds:
            raise CalibrationDataError(
                f"dataset {config.source!r} has no split {config.split!r}; set split= to one "
                f"of {sorted(ds)}.")
        ds = ds[config.split]
    if not isinstance(ds, datasets.Dataset):
        raise CalibrationDataError(
            f"dataset {config.source!r} loaded as {type(ds).__name__}; calibration needs a "
            "map-style datasets.Dataset (not streaming).")
    return ds


def _root_cause(err: BaseException) -> str:
    """``Type: first line`` of the innermost cause (datasets wraps the useful error: "An error occurred while
    generating the dataset" hides "CastError: Couldn't cast ...")."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def _folder_hint(path: Path) -> str:
    """For a local folder read as a dataset: what it holds (a model folder given by mistake shows its
    config files)."""
    if not path.is_dir():
        return ""
    from vlmptq.checkpoint.config import summarize_names

    names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    return f" The folder was read as a dataset folder and holds {summarize_names(names, 8)}."


class HFDatasetSource(Source):
    """A ``datasets`` dataset: ``load_from_disk`` for saved directories, else ``load_dataset``."""

    def __init__(self, config: CalibConfig) -> None:
        import datasets

        self.config = config
        path = Path(config.source).expanduser()
        self.label = path.name if path.is_dir() else config.source
        ds = load_hf_dataset(config)
        columns = list(ds.column_names)
        text_column = None if reads_conversations(config, columns) else config.text_column  # else LLaVA rows
        image_column = image_key(config, columns)
        if image_column not in columns and config.video_column in columns:
            image_column = None  # a video dataset
        for column, field in ((image_column, "image_column"),
                              (text_column, "text_column"),
                              (config.prompt_column, "prompt_column")):
            if column is not None and column not in columns:
                raise CalibrationDataError(
                    f"dataset {config.source!r} has no column {column!r} ({field}); its columns "
                    f"are {columns}. Set {field}= to the column that holds it.")
        column = image_key(config, columns)
        feature = ds.features.get(column)
        # Decode ourselves so one corrupt image is one bad sample, not a crash in datasets (a list of images too).
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(column, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)) and isinstance(
                feature.feature, datasets.Image) and feature.feature.decode:
            ds = ds.cast_column(column, type(feature)(datasets.Image(decode=False)))
        self.ds, self.base_dir = ds, image_root(config, path if path.is_dir() else None)

    def __len__(self) -> int:
        return len(self.ds)

    def record(self, index: int) -> Record:
        sample_id = f"{self.label}[{index}]"
        row = self.ds[int(index)]
        values, text, prompt = row_fields(row, self.config, sample_id, "the dataset")
        return Record(sample_id, tuple(self._image(v, sample_id) for v in values), text, prompt,
                      videos=_videos(row, self.config, self.base_dir, sample_id))

    def _image(self, value: object, sample_id: str) -> Image.Image:
        if isinstance(value, Image.Image):
            return to_rgb(value)
        if isinstance(value, dict) and value.get("bytes"):
            return load_image_bytes(value["bytes"], sample_id)
        if isinstance(value, dict) and value.get("path"):
            value = value["path"]
        if isinstance(value, bytes) and value:
            return load_image_bytes(value, sample_id)
        if isinstance(value, str) and value.strip():
            return load_image_file(local_image_path(value, self.base_dir, sample_id), sample_id)
        raise bad_sample(sample_id, f"column {self.config.image_column!r} holds no image "
                         f"({type(value).__name__})", "store an image (datasets.Image feature), "
                         "encoded image bytes or a path in that column")
