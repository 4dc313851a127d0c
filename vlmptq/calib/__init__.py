"""Calibration data: image-text pairs as model inputs with a per-token modality mask.

    samples = load_calibration(CalibConfig(source="builtin"), processor, [image_token_id])

See docs/calibration.md for the accepted sources, the mask definition and the error/skip policy.
"""

from vlmptq.calib.builtin import BUILTIN_HOLDOUT, BUILTIN_PROMPTS
from vlmptq.calib.config import DEFAULT_PROMPT, CalibConfig
from vlmptq.calib.encode import CalibSample, chat_messages
from vlmptq.calib.loader import load_calibration

__all__ = [
    "BUILTIN_HOLDOUT", "BUILTIN_PROMPTS", "DEFAULT_PROMPT", "CalibConfig", "CalibSample",
    "chat_messages", "load_calibration",
]
