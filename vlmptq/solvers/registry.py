"""The solver registry: one dict, one decorator."""

from __future__ import annotations

from collections.abc import Callable

from vlmptq.errors import ConfigError

SOLVERS: dict[str, type] = {}
_USES: dict[str, tuple[str, ...]] = {}


def register_solver(name: str, uses: tuple[str, ...]) -> Callable[[type], type]:
    """Register a solver class under ``name``; ``uses`` lists the SolverOptions fields it reads."""

    def deco(cls: type) -> type:
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is already registered")
        SOLVERS[name] = cls
        _USES[name] = uses
        return cls

    return deco


def build_solver(name: str, options=None):
    """Instantiate solver ``name`` with ``options`` (a SolverOptions); options it does not use and
    that differ from their defaults are rejected, so a typo'd combination never silently does nothing."""
    from vlmptq.solvers.base import SolverOptions

    if name not in SOLVERS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(SOLVERS)}")
    options = options or SolverOptions()
    unused = [
        f for f in options.model_fields_set
        if f not in _USES[name] and getattr(options, f) != SolverOptions.model_fields[f].default
    ]
    if unused:
        raise ConfigError(f"option(s) {sorted(unused)} do not apply to method {name!r} (it uses {list(_USES[name])})")
    return SOLVERS[name](options)
