"""Regenerate ``vlmptq/data/builtin_calib`` (the built-in calibration photos) from scikit-image.

    python -m vlmptq.data.make_builtin_calib [--out DIR]   # needs scikit-image (the "bench" extra)

Only photos that scikit-image documents as CC0 or public domain are copied; each is downscaled to
at most 448 px on its long side and stored as JPEG (quality 85; grayscale photos stay grayscale).
The captions below were written from the scikit-image docstrings and by looking at the photos:
what is in the picture, nothing invented. The photos in ``BUILTIN_HOLDOUT`` are reserved for
evaluation and never copied.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_SIDE = 448
JPEG_QUALITY = 85
OUT_DIR = Path(__file__).resolve().parent / "builtin_calib"
SKIMAGE_URL = "https://github.com/scikit-image/scikit-image, folder skimage/data"


@dataclass(frozen=True)
class Photo:
    name: str  # skimage.data function
    caption: str
    license: str
    origin: str  # author / where scikit-image took it from
    flip: bool = True  # False: contains text, never mirror


PHOTOS = (
    Photo("astronaut",
          "Official portrait of NASA astronaut Eileen Collins, a smiling woman with short brown "
          "hair in an orange spacesuit with mission patches, holding a white helmet with a dark "
          "visor. An American flag hangs on the left and a model of the space shuttle on its "
          "launch stack stands behind her on the right. Collins first piloted the space shuttle "
          "on mission STS-63 in 1995.",
          "Public domain (NASA photograph; no known copyright restrictions)",
          "NASA Great Images database, https://flic.kr/p/r9qvLn"),
    Photo("camera",
          "Black-and-white photo of a man in a dark overcoat and gloves looking through a video "
          "camera mounted on a tripod. He stands on a wide lawn; buildings, a tall tower and a "
          "domed roof are visible in the distance under a pale sky.",
          "CC0 1.0 (dedicated by the photographer)",
          "Lav Varshney; replaced the former 'cameraman' image in scikit-image 0.18"),
    Photo("coffee",
          "A cup of espresso with golden crema in a red ceramic cup with a white inside, on a "
          "matching red saucer with a small metal spoon, on a worn wooden table.",
          "CC0 1.0 (dedicated by the photographer)",
          "Rachel Michetti, courtesy of Pikolo Espresso Bar"),
    Photo("rocket",
          "A SpaceX Falcon 9 rocket carrying the DSCOVR satellite stands on the launch pad at "
          "Launch Complex 40, Cape Canaveral Air Force Station, Florida, at dusk, between tall "
          "lightning towers, with bright lights along the ground and a deep blue sky.",
          "Public domain (released by SpaceX in 2015)",
          "SpaceX Photos, https://www.flickr.com/photos/spacexphotos/16511594820/"),
    Photo("hubble_deep_field",
          "The Hubble eXtreme Deep Field: thousands of distant galaxies, spirals, ellipticals and "
          "faint red specks, scattered over a black sky. It is the Hubble Space Telescope's "
          "farthest view of the universe.",
          "Public domain (NASA; may be freely used)",
          "HubbleSite, http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/"),
    Photo("retina",
          "Colour fundus photograph of a normal human left eye: the orange-red retina fills a "
          "circle on a black background, with the bright optic disc on the left, blood vessels "
          "branching out from it and the darker macula near the centre.",
          "CC0 1.0 Universal Public Domain Dedication",
          "Mikael Häggström, Wikimedia Commons, "
          "https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg"),
    Photo("clock",
          "Grayscale photo of a round wall clock on a plain grey wall, heavily motion-blurred: the "
          "camera moved sideways during the exposure, so the clock face is a smeared bright oval "
          "and its hands cannot be read.",
          "Public domain (released by the photographer)",
          "Stefan van der Walt"),
    Photo("brick",
          "Grayscale close-up of a brick wall seen at a slight angle: long, narrow dark-grey "
          "bricks in staggered rows, rotated so that they run vertically, separated by light "
          "mortar lines.",
          "CC0 1.0",
          "CC0Textures (Bricks25), https://cc0textures.com/view.php?tex=Bricks25; perspective "
          "corrected, rotated and cropped by scikit-image"),
    Photo("grass",
          "Grayscale close-up of grass seen from above: dense, tangled blades of grass mixed "
          "with small leaves and clover.",
          "CC0 1.0",
          "linolafett on DeviantArt, https://www.deviantart.com/linolafett/art/Grass-01-434853879"),
    Photo("gravel",
          "Grayscale close-up of gravel seen from above: many small, angular grey stones packed "
          "tightly together.",
          "CC0 1.0",
          "CC0Textures (Gravel04), https://cc0textures.com/view.php?tex=Gravel04"),
    Photo("cell",
          "Grayscale quantitative phase microscopy image of a single round cell floating in "
          "saline: a bright disc on a noisy grey background with faint banding, retrieved from a "
          "digital hologram.",
          "CC0 1.0 (dedicated to the public domain)",
          "Paul Müller et al., Optics Express 26(8) 10729 (2018), processed with qpformat"),
    Photo("text",
          "Grayscale close-up of handwritten mathematical formulas on lined paper, photographed at "
          "a steep angle, so the rows of handwriting run diagonally and blur towards the edges.",
          "Public domain (no known copyright restrictions)",
          "Wikipedia, https://en.wikipedia.org/wiki/File:Corner.png",
          flip=False),
    Photo("horse",
          "A black silhouette of a horse standing in profile, facing right, on a white background.",
          "CC0 1.0 (given by the owner)",
          "Andreas Preuss (marauder), openclipart, "
          "http://openclipart.org/detail/158377/horse-by-marauder"),
)


def _load(name: str):
    import numpy as np
    import skimage.data
    from PIL import Image

    array = getattr(skimage.data, name)()
    if array.dtype == bool:  # the horse silhouette is a boolean mask
        array = np.where(array, 255, 0).astype(np.uint8)
    img = Image.fromarray(array)
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return img.convert("L" if array.ndim == 2 else "RGB")


def build(out: Path = OUT_DIR) -> None:
    """Write the photos, captions.jsonl and LICENSES.md into ``out`` (replacing old photos)."""
    import skimage

    from vlmptq.calib.builtin import BUILTIN_HOLDOUT

    clash = sorted({p.name for p in PHOTOS} & set(BUILTIN_HOLDOUT))
    if clash:
        raise ValueError(f"{clash} are held out for evaluation and must not be calibration photos")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.jpg"):
        old.unlink()
    rows, licenses = [], []
    for photo in PHOTOS:
        img = _load(photo.name)
        file = f"{photo.name}.jpg"
        img.save(out / file, quality=JPEG_QUALITY, optimize=True)
        rows.append({"image": file, "text": photo.caption, "flip": photo.flip})
        licenses.append(f"| {file} | {img.width}x{img.height} | {photo.license} | {photo.origin} |")
        log.info("%s: %dx%d, %d bytes", file, img.width, img.height, (out / file).stat().st_size)
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "LICENSES.md").write_text(_licenses_md(licenses, skimage.__version__, BUILTIN_HOLDOUT),
                                     encoding="utf-8")


def _licenses_md(lines: list[str], version: str, holdout: tuple[str, ...]) -> str:
    return "\n".join([
        "# Built-in calibration photos: sources and licenses",
        "",
        f"Copied from the sample data of scikit-image {version} ({SKIMAGE_URL}) by "
        "`vlmptq/data/make_builtin_calib.py`: "
        f"downscaled to at most {MAX_SIDE} px on the long side and re-encoded as JPEG "
        f"(quality {JPEG_QUALITY}). Licenses and origins are as stated in the scikit-image "
        "docstrings (`help(skimage.data.<name>)`). Only photos stated to be CC0 or in the public "
        "domain are included; they may be copied, modified and redistributed without permission. "
        "The captions in captions.jsonl were written for vlmptq (Apache-2.0, like the code).",
        "",
        "| file | size (px) | license | origin |",
        "|---|---|---|---|",
        *lines,
        "",
        "Held out for evaluation and not included (`vlmptq.calib.BUILTIN_HOLDOUT`; "
        "stereo_motorcycle means its left image): " + ", ".join(holdout) + ".",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder to (re)write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.out)


if __name__ == "__main__":
    main()
