"""Errors users can act on. Every message says what was wrong and how to fix it."""


class VlmptqError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in vlmptq."""


class ConfigError(VlmptqError, ValueError):
    """An invalid option or combination of options."""


class UnsupportedModelError(VlmptqError):
    """The model's architecture has no adapter."""


class CalibrationDataError(VlmptqError):
    """A calibration sample could not be read or does not fit the limits."""


class SolverError(VlmptqError):
    """The solver cannot proceed (non-finite inputs, a Hessian that will not factor, ...)."""


class CheckpointError(VlmptqError):
    """A checkpoint is missing tensors, has mis-shaped tensors or an unreadable config."""
