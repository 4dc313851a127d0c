"""``load_calibration``: draw, decode and encode calibration samples under the error/skip policy."""

from __future__ import annotations

import logging
import random
from collections.abc import Collection

from tqdm.auto import tqdm

from vlmptq.calib.config import CalibConfig
from vlmptq.calib.encode import CalibSample, check_vision_token_ids, encode_record
from vlmptq.calib.sources import Source, open_source
from vlmptq.errors import CalibrationDataError

log = logging.getLogger(__name__)


def draw_order(source: Source, num_samples: int, seed: int) -> list[int]:
    """Candidate indices in the order they are tried.

    All candidates when the source has no more than ``num_samples`` (in source order), otherwise a
    seeded permutation: the first ``num_samples`` usable ones are taken, so a skipped sample is
    replaced by the next candidate. Ordered sources (the built-in stream) are taken as they come.
    """
    n = len(source)
    if source.ordered or n <= num_samples:
        return list(range(n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def load_calibration(config: CalibConfig, processor,
                     vision_token_ids: Collection[int]) -> list[CalibSample]:
    """Load ``config.num_samples`` calibration samples (fewer if the source has fewer).

    ``processor``: the model's Hugging Face processor (chat template + image processor).
    ``vision_token_ids``: the model's image/video placeholder token ids (they define the vision
    mask).
    Raises ``CalibrationDataError`` for an unusable source, and for a bad sample unless
    ``config.on_bad_sample == "skip"``.
    """
    vision_ids = check_vision_token_ids(vision_token_ids)
    source = open_source(config)
    available = len(source)
    if available == 0:
        raise CalibrationDataError(
            f"calibration source {config.source!r} holds no samples; add image-caption pairs to it "
            "or choose another source (source='builtin' needs no files).")
    if available < config.num_samples:
        log.info("calibration source %r has %d samples, fewer than num_samples=%d: using all of "
                 "them", config.source, available, config.num_samples)
    wanted = min(available, config.num_samples)

    samples: list[CalibSample] = []
    skipped = tried = 0
    with tqdm(total=wanted, desc="calibration samples", unit="sample", leave=False,
              disable=None) as bar:  # None: no bar when stderr is not a terminal
        for index in draw_order(source, config.num_samples, config.seed):
            if len(samples) == wanted:
                break
            tried += 1
            try:
                sample = encode_record(source.record(index), processor, vision_ids, config)
            except CalibrationDataError as err:
                if config.on_bad_sample == "error":
                    raise
                skipped += 1
                log.warning("skipping: %s", err)
                continue
            samples.append(sample)
            bar.update(1)

    if skipped:
        log.warning("skipped %d bad calibration sample(s) of %d tried from %r "
                    "(on_bad_sample='skip')", skipped, tried, config.source)
    if not samples:
        raise CalibrationDataError(
            f"every calibration sample tried from {config.source!r} was bad ({skipped} skipped; "
            "see the warnings above for each one and its fix).")
    if len(samples) < config.num_samples:
        log.info("using %d calibration samples (num_samples=%d)", len(samples), config.num_samples)
    vision = sum(int(s.vision_mask.sum()) for s in samples)
    text = sum(int(s.text_mask.sum()) for s in samples)
    log.info("calibration set: %d samples from %r, %d vision + %d text tokens", len(samples),
             config.source, vision, text)
    return samples
