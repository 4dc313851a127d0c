"""A run interrupted mid-way (Ctrl-C, a pre-empted job) at a chosen decoder layer, for resume tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import vlmptq.pipeline.sequential as sequential


def interrupt_in_layer(monkeypatch: pytest.MonkeyPatch, run: Callable[[], object], layer: int = 1) -> None:
    """Call ``run`` with the pipeline raising KeyboardInterrupt at the first linear of decoder layer
    ``layer``; fails unless ``run`` is interrupted there."""
    original = sequential._solve_linear

    def stop(lin, full, *args, **kwargs):
        if f".layers.{layer}." in full:
            raise KeyboardInterrupt
        return original(lin, full, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(sequential, "_solve_linear", stop)
        with pytest.raises(KeyboardInterrupt):
            run()
