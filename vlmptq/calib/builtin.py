"""The built-in calibration set: CC0 / public-domain photos in ``vlmptq/data/builtin_calib``.

13 scikit-image photos (downscaled to at most 448 px, see ``vlmptq/data/make_builtin_calib.py`` and
the folder's LICENSES.md) with factual captions. To give any ``num_samples`` from 13 photos, the set
is a deterministic, seeded stream: it visits the photos in a seeded order, cycle after cycle; the
first cycle shows each photo whole, later cycles show a random crop (each side 60-100% of the photo)
that is mirrored half of the time (never for photos of text). Every sample pairs the photo's caption
with one of ``BUILTIN_PROMPTS``. The same seed always gives the same samples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlmptq.calib.config import CalibConfig
from vlmptq.calib.records import Record, load_image_file
from vlmptq.calib.sources import CAPTIONS_FILE, Source, parse_records
from vlmptq.errors import CalibrationDataError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "data" / "builtin_calib"

# scikit-image photos kept OUT of the built-in set so that evaluation (KL / quality prompts) never
# sees a calibration photo. Names are ``skimage.data`` functions (``stereo_motorcycle`` means its
# left image). They are not shipped here; the benchmark loads them from scikit-image itself, which
# is also why the ones without an explicit CC0/public-domain statement (motorcycle, coins,
# immunohistochemistry, page, moon) are fine there but could not be redistributed by us.
BUILTIN_HOLDOUT = ("chelsea", "stereo_motorcycle", "coins", "immunohistochemistry", "page", "moon")

BUILTIN_PROMPTS = (
    "Describe this image.",
    "What is shown in this picture?",
    "Write a short caption for this photo.",
    "What do you see in this image? Answer in one or two sentences.",
    "Give a brief, factual description of the scene.",
    "Describe the main subject of this image and its surroundings.",
    "What is this a photo of?",
    "Summarize the contents of this image.",
    "Explain what this picture shows.",
    "Provide a detailed description of this image.",
)

MIN_CROP_SIDE = 0.6  # crops keep at least this fraction of each side, so the caption still fits
_CYCLES = 1000  # stream length = photos x cycles; "unlimited" for any sensible num_samples


@dataclass(frozen=True)
class BuiltinPhoto:
    file: str  # file name inside BUILTIN_DIR
    caption: str
    flip: bool  # may be mirrored (False for photos containing text)


def builtin_photos(root: Path = BUILTIN_DIR) -> list[BuiltinPhoto]:
    """The photos listed in the set's captions file, in file order."""
    captions = root / CAPTIONS_FILE
    if not captions.is_file():
        raise CalibrationDataError(
            f"the built-in calibration set is missing ({captions} not found); reinstall vlmptq "
            "with its package data or regenerate it with python -m vlmptq.data.make_builtin_calib.")
    photos = []
    for _, row in parse_records(captions):
        if isinstance(row, CalibrationDataError):
            raise row
        photos.append(BuiltinPhoto(row["image"], row["text"], bool(row.get("flip", True))))
    return photos


@dataclass(frozen=True)
class Variant:
    """What sample ``k`` of the stream shows: which photo, which crop box, mirrored or not."""

    photo: BuiltinPhoto
    box: tuple[float, float, float, float] | None  # (left, top, right, bottom) as fractions
    flip: bool
    prompt: str


def builtin_variant(photos: list[BuiltinPhoto], k: int, seed: int) -> Variant:
    """Sample ``k`` of the seeded stream (a pure function of ``k`` and ``seed``)."""
    order = list(range(len(photos)))
    random.Random(f"vlmptq-builtin-order:{seed}").shuffle(order)
    cycle, pos = divmod(k, len(photos))
    photo = photos[order[pos]]
    rng = random.Random(f"vlmptq-builtin:{seed}:{k}")
    prompt = rng.choice(BUILTIN_PROMPTS)
    if cycle == 0:
        return Variant(photo, None, False, prompt)
    w, h = rng.uniform(MIN_CROP_SIDE, 1.0), rng.uniform(MIN_CROP_SIDE, 1.0)
    x, y = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
    flip = photo.flip and rng.random() < 0.5
    return Variant(photo, (x, y, x + w, y + h), flip, prompt)


def render(image: Image.Image, variant: Variant) -> Image.Image:
    """Apply the variant's crop and mirror to the full photo."""
    if variant.box is not None:
        l, t, r, b = variant.box
        image = image.crop((round(l * image.width), round(t * image.height),
                            round(r * image.width), round(b * image.height)))
    if variant.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


class BuiltinSource(Source):
    """The seeded stream of built-in samples (already ordered: the loader takes them in turn)."""

    ordered = True

    def __init__(self, config: CalibConfig, root: Path = BUILTIN_DIR) -> None:
        self.config, self.root, self.label = config, root, "builtin"
        self.photos = builtin_photos(root)
        self._cache: dict[str, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.photos) * _CYCLES

    def record(self, index: int) -> Record:
        v = builtin_variant(self.photos, index, self.config.seed)
        sample_id = f"builtin:{v.photo.file}[{index}]"
        if v.box is not None:
            sample_id += " crop=({:.2f},{:.2f},{:.2f},{:.2f})".format(*v.box)
        if v.flip:
            sample_id += " mirrored"
        if v.photo.file not in self._cache:
            self._cache[v.photo.file] = load_image_file(self.root / v.photo.file, sample_id)
        return Record(sample_id, (render(self._cache[v.photo.file], v),), v.photo.caption, v.prompt)
