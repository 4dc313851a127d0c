"""Calibration for text-only models: windows of ``max_seq_len`` tokens cut from a text corpus.

A text-only model (``llama``, ``qwen2``, ``qwen3``, ``gemma3_text``, ``mistral``) has no image tokens,
so it calibrates the way GPTQ calibrates language models: the texts are read in a seeded order and
tokenized into one stream (documents separated by a blank line) until it holds enough tokens, and
``num_samples`` non-overlapping windows of ``max_seq_len`` tokens (the tokenizer's BOS first, if it
adds one) are drawn from it. Every token is a text token (the vision mask is empty, so VLM-PTQ's
modality-aware weighting sees only text).

Sources (``CalibConfig.source``): a ``.txt`` file, a folder of ``.txt`` files, a ``.jsonl`` / ``.json``
file of records whose ``text_column`` holds the text, or a Hugging Face dataset with that column (hub
name, local dataset folder, or a ``save_to_disk`` folder; e.g. wikitext or c4). ``"builtin"`` holds
image-caption pairs and is refused with these choices.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from vlmptq.calib.config import CalibConfig
from vlmptq.calib.encode import CalibSample
from vlmptq.calib.records import bad_sample, require_text
from vlmptq.errors import CalibrationDataError

log = logging.getLogger(__name__)

TEXT_FORMS = ("a .txt file; a folder of .txt files; a .jsonl / .json file of {\"text\": ...} records; or a Hugging "
              "Face dataset with a text column (hub name such as wikitext, local dataset folder, or a folder "
              "written by Dataset.save_to_disk); --text-column names another key or column")
SEPARATOR = "\n\n"
CHUNK_CHARS = 1 << 20  # a .txt file is read (and tokenized) this many characters at a time


def check_text_source(config: CalibConfig, model: str) -> None:
    """Fail before any weights load if ``config.source`` cannot calibrate a text-only model: the built-in
    image set, or a local path that does not exist."""
    if config.source == "builtin":
        raise CalibrationDataError(
            f"{model} is a text-only model and the built-in calibration set holds image-caption pairs; "
            f"calibrate it on text: --calib {TEXT_FORMS}. (RTN needs no calibration.)")
    _check_exists(config)


def _check_exists(config: CalibConfig) -> None:
    """A source that names a local file or folder (a suffix we read, or a path prefix) must exist; anything
    else may be a Hugging Face dataset name."""
    src = config.source
    local = src.endswith((".txt", ".jsonl", ".json")) or src.startswith(("/", "./", "../", "~"))
    if local and not Path(src).expanduser().exists():
        raise CalibrationDataError(f"calibration source {src!r} does not exist; check the path (for a text-only "
                                   f"model: {TEXT_FORMS})")


def _texts(config: CalibConfig) -> Iterator[tuple[str, str | CalibrationDataError]]:
    """(id, text or what is wrong with that record) of the source's documents in a seeded order, each text
    ending in ``SEPARATOR`` (.txt files in pieces, read as they are needed)."""
    _check_exists(config)
    path = Path(config.source).expanduser()
    if path.is_file() and path.suffix.lower() == ".txt":
        for piece in _pieces(path):
            yield path.name, piece
        return
    if path.is_dir() and not _is_dataset_dir(path):
        files = sorted(path.glob("*.txt"))
        if not files:
            raise CalibrationDataError(f"calibration source {config.source!r} is a folder without .txt files; "
                                       f"for a text-only model give {TEXT_FORMS}")
        random.Random(config.seed).shuffle(files)
        for f in files:
            for piece in _pieces(f):
                yield f.name, piece
        return
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        from vlmptq.calib.sources import parse_records

        records = parse_records(path)
        random.Random(config.seed).shuffle(records)
        for sid, obj in records:
            yield sid, _field(obj, config, sid)
        return
    if path.is_file():
        raise CalibrationDataError(f"calibration source {config.source!r} is neither .txt, .jsonl nor .json; for a "
                                   f"text-only model give {TEXT_FORMS}")
    from vlmptq.calib.sources import load_hf_dataset

    ds = load_hf_dataset(config, TEXT_FORMS)
    if config.text_column not in ds.column_names:
        raise CalibrationDataError(f"dataset {config.source!r} has no column {config.text_column!r}; its columns "
                                   f"are {list(ds.column_names)}. Set text_column= (--text-column) to the one "
                                   "holding the text.")
    order = list(range(len(ds)))
    random.Random(config.seed).shuffle(order)
    label = path.name if path.is_dir() else config.source
    for i in order:
        sid = f"{label}[{i}]"
        yield sid, _field(ds[i], config, sid)


def _is_dataset_dir(path: Path) -> bool:
    """A folder ``datasets`` loads: a ``save_to_disk`` folder, or data files with no .txt among them."""
    from vlmptq.calib.sources import is_dataset_folder

    return is_dataset_folder(path) or (not any(path.glob("*.txt")) and any(
        f.suffix in (".parquet", ".arrow", ".csv", ".jsonl") for f in path.rglob("*")))


def _pieces(path: Path) -> Iterator[str]:
    """A .txt file's text in pieces of about ``CHUNK_CHARS`` characters, each cut after a line break that a
    non-space character follows (a boundary BPE pre-tokenizers split at anyway), the last with ``SEPARATOR``
    added: tokenized one after another they give the whole file's tokens, and a corpus much larger than
    calibration needs is read only as far as it needs."""
    try:
        with path.open(encoding="utf-8") as f:
            rest = ""
            while chunk := f.read(CHUNK_CHARS):
                text = rest + chunk
                cut = max(text.rfind("\n", 0, len(text) - 1), 0)
                while cut and text[cut + 1].isspace():  # a run of blank lines is one token: keep it whole
                    cut = max(text.rfind("\n", 0, cut), 0)
                if cut:
                    yield text[:cut + 1]
                    text = text[cut + 1:]
                rest = text  # no usable break yet (a very long line): read on
    except (OSError, UnicodeDecodeError) as err:
        raise CalibrationDataError(f"cannot read {str(path)!r} ({err}); it must be a UTF-8 text file.") from err
    yield rest + SEPARATOR


def _field(obj, config: CalibConfig, sid: str) -> str | CalibrationDataError:
    if isinstance(obj, CalibrationDataError):
        return obj
    if config.text_column not in obj:
        return bad_sample(sid, f"has no {config.text_column!r} key (its keys: {sorted(obj)})",
                          "add it or set text_column= (--text-column) to the key that holds the text")
    try:
        return require_text(obj[config.text_column], f"the text {config.text_column!r}", sid,
                            "give every record a non-empty text") + SEPARATOR
    except CalibrationDataError as err:
        return err


def load_text_calibration(config: CalibConfig, tokenizer) -> list[CalibSample]:
    """``config.num_samples`` windows of ``config.max_seq_len`` tokens (fewer if the source is short:
    logged; a source shorter than one window gives one shorter sample). Bad records (a missing key,
    empty text) raise unless ``config.on_bad_sample == "skip"``."""
    bos = tokenizer.bos_token_id
    bos = bos if bos is not None and tokenizer("x").input_ids[:1] == [bos] else None
    body = config.max_seq_len - (bos is not None)
    need = config.num_samples * body
    stream: list[int] = []
    skipped = 0
    for sid, text in _texts(config):
        if isinstance(text, CalibrationDataError):
            if config.on_bad_sample == "error":
                raise text
            skipped += 1
            log.warning("skipping: %s", text)
            continue
        stream += tokenizer(text, add_special_tokens=False).input_ids
        if len(stream) >= 4 * need:  # enough to draw from; a large dataset is not tokenized whole
            break
    if skipped:
        log.warning("skipped %d bad calibration record(s) of %r (on_bad_sample='skip')", skipped, config.source)
    if len(stream) < 16:
        raise CalibrationDataError(f"calibration source {config.source!r} holds {len(stream)} tokens of text; "
                                   "give at least a few thousand tokens (GPTQ calibrates on 128 x 2048)")
    count = len(stream) // body
    if count == 0:
        log.warning("calibration source %r holds %d tokens, fewer than max_seq_len=%d: one shorter sample",
                    config.source, len(stream), config.max_seq_len)
        starts, body = [0], len(stream)
    else:
        drawn = random.Random(config.seed).sample(range(count), min(count, config.num_samples))
        starts = [i * body for i in sorted(drawn)]
    if len(starts) < config.num_samples:
        log.info("calibration source %r holds %d tokens: %d windows of %d tokens (num_samples=%d)",
                 config.source, len(stream), len(starts), config.max_seq_len, config.num_samples)
    tokens = torch.tensor(stream, dtype=torch.long)
    samples = []
    for start in starts:
        ids = tokens[start:start + body]
        if bos is not None:
            ids = torch.cat([torch.tensor([bos]), ids])
        t = ids.numel()
        samples.append(CalibSample({"input_ids": ids[None], "attention_mask": torch.ones(1, t, dtype=torch.long)},
                                   torch.zeros(t, dtype=torch.bool), torch.ones(t, dtype=torch.bool),
                                   f"{Path(config.source).name}:tokens[{start}:{start + body}]"))
    log.info("calibration set: %d text windows of %d tokens from %r", len(samples), samples[0].num_tokens,
             config.source)
    return samples
