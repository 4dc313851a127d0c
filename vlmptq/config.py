"""The one configuration object of :func:`vlmptq.quantize`, validated at the boundary."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlmptq.calib import CalibConfig
from vlmptq.errors import ConfigError
from vlmptq.quant.scheme import WeightScheme
from vlmptq.solvers import SOLVERS, SolverOptions, build_solver

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class SchemeOverride(BaseModel):
    """Decoder linears whose full module name matches ``pattern`` (``re.search``) take ``bits`` (and
    ``group_size``, default the base one) instead of the base scheme; symmetry follows the base."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: str = Field(description="regex searched in the full module name, e.g. 'mlp\\.down_proj$'")
    bits: int = Field(description="weight bits: 2, 3, 4 or 8")
    group_size: int | None = Field(None, description="32, 64, 128 or -1 (default: the base group size)")

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"{v!r} is not a valid regular expression: {e}") from None
        return v

    @classmethod
    def parse(cls, spec: str) -> SchemeOverride:
        """``REGEX=BITS`` or ``REGEX=BITS:GROUP`` (the CLI's ``--override``)."""
        pattern, sep, value = spec.rpartition("=")
        bits, _, group = value.partition(":")
        try:
            if not sep or not pattern:
                raise ValueError
            return cls(pattern=pattern, bits=int(bits), group_size=int(group) if group else None)
        except ValueError as e:
            detail = f": {'; '.join(err['msg'] for err in e.errors())}" if isinstance(e, ValidationError) else ""
            raise ConfigError(f"--override {spec!r} is not REGEX=BITS or REGEX=BITS:GROUP (e.g. "
                              f"'mlp\\.down_proj$=4' or 'layers\\.0\\.=4:64'){detail}") from None


class QuantizeConfig(BaseModel):
    """How to quantize: method, weight scheme, solver options, calibration data, devices.

    Unknown fields are rejected; every error names the field, the value and what to use instead.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    method: str = Field("vlmptq", description="rtn | gptq | gptaq | vlmptq")
    bits: int = Field(4, description="weight bits: 2, 3, 4 or 8")
    group_size: int = Field(128, description="columns per scale/zero: 32, 64, 128, or -1 (per channel)")
    symmetric: bool = Field(False, description="symmetric grid (no zero points); the paper uses asymmetric")
    lm_head_bits: int | None = Field(None, description="also quantize the lm_head to 2/3/4/8 bits (None: 16-bit)")
    lm_head_group_size: int | None = Field(None, description="the lm_head's group size (default: group_size)")
    solver: SolverOptions = Field(default_factory=SolverOptions, description="solver options")
    calib: CalibConfig = Field(default_factory=CalibConfig, description="calibration data")
    ignore: tuple[str, ...] = Field((), description="regexes of decoder-layer linears to keep in 16-bit")
    overrides: tuple[SchemeOverride, ...] = Field(
        (), description="other bits / group sizes for some decoder linears (first match wins): mixed precision")
    target_bits: float | None = Field(
        None, description="automatic mixed precision: the average code bits per decoder-linear weight; each linear "
                          "(q/k/v and gate/up together) takes one of bits_choices, chosen by a sensitivity pass "
                          "(vlmptq.allocation); linears an override takes keep its scheme and count in the average")
    bits_choices: tuple[int, ...] = Field((2, 3, 4), description="the bit widths target_bits chooses from")
    device: str = Field("auto", description="compute device: auto (cuda if available), cpu, cuda, cuda:N")
    offload_device: str = Field("cpu", description="where per-sample activations wait between layers")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="model dtype")
    lazy_load: bool | None = Field(
        None, description="read the decoder layers from the model's files one at a time (vlmptq.models.lazy; the "
                          "result is the same); None: only when the weights would not fit in the available memory")
    overwrite: bool = Field(False, description="replace a non-empty output directory")
    resume: bool = Field(False, description="continue an interrupted run from the layers it finished "
                                            "(kept in <out>.vlmptq-progress/)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in SOLVERS:
            raise ValueError(f"unknown method {v!r}; choose one of {sorted(SOLVERS)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "QuantizeConfig":
        self._check_target_bits()
        self.scheme  # validates bits / group size
        for i, o in enumerate(self.overrides):
            try:
                self._override_scheme(o)
            except ConfigError as e:
                raise ValueError(f"overrides[{i}] ({o.pattern!r}): {e}") from None
        if self.lm_head_bits is None and self.lm_head_group_size is not None:
            raise ValueError("lm_head_group_size is set but lm_head_bits is not; set lm_head_bits to quantize "
                             "the lm_head")
        try:
            self.head_scheme
        except ConfigError as e:
            raise ValueError(f"lm_head_bits / lm_head_group_size: {e}") from None
        build_solver(self.method, self.solver)  # validates option/method combinations
        for dev in (self.device, self.offload_device):
            if dev != "auto":
                try:
                    torch.device(dev)
                except RuntimeError as e:
                    raise ValueError(f"device {dev!r} is not a torch device ({e}); use cpu, cuda or cuda:N")
        return self

    def _check_target_bits(self) -> None:
        if self.target_bits is None:
            if "bits_choices" in self.model_fields_set:
                raise ValueError("bits_choices (--bits-choices) is set but target_bits (--target-bits) is not; set "
                                 "target_bits, the average bits per weight, to choose each linear's bits from them")
            return
        if "bits" in self.model_fields_set:
            raise ValueError("bits (--bits) and target_bits (--target-bits) exclude each other: with target_bits each "
                             f"linear's bits are chosen from bits_choices {list(self.bits_choices)}; drop bits")
        choices = self.bits_choices
        for b in choices:
            WeightScheme(bits=b, group_size=self.group_size, symmetric=self.symmetric)  # supported bits
        if len(set(choices)) < 2 or list(choices) != sorted(set(choices)):
            raise ValueError(f"bits_choices must be at least two different bit widths in increasing order, got "
                             f"{list(choices)}")
        if not choices[0] <= self.target_bits <= choices[-1]:
            raise ValueError(f"target_bits={self.target_bits:g} is outside bits_choices {list(choices)}: an average "
                             f"of their widths lies between {choices[0]} and {choices[-1]}")

    @property
    def scheme(self) -> WeightScheme:
        """The decoder linears' scheme; with ``target_bits``, the fewest of ``bits_choices`` (the allocation
        gives each linear its own)."""
        bits = self.bits if self.target_bits is None else self.bits_choices[0]
        return WeightScheme(bits=bits, group_size=self.group_size, symmetric=self.symmetric)

    def _override_scheme(self, o: SchemeOverride) -> WeightScheme:
        group = self.group_size if o.group_size is None else o.group_size
        return WeightScheme(bits=o.bits, group_size=group, symmetric=self.symmetric)

    def scheme_resolver(self, allocated: Mapping[str, int] | None = None) -> Callable[[str], WeightScheme]:
        """Full module name -> its scheme: the first matching override's, else the bits ``allocated`` to it
        (``target_bits``: vlmptq.allocation), else the base scheme."""
        rules = [(re.compile(o.pattern), self._override_scheme(o)) for o in self.overrides]
        base = self.scheme
        auto = {b: WeightScheme(bits=b, group_size=self.group_size, symmetric=self.symmetric)
                for b in set((allocated or {}).values())}

        def scheme_for(name: str) -> WeightScheme:
            rule = next((s for rx, s in rules if rx.search(name)), None)
            if rule is not None:
                return rule
            return auto[allocated[name]] if allocated and name in allocated else base

        return scheme_for

    @property
    def head_scheme(self) -> WeightScheme | None:
        """The lm_head's scheme (symmetry as the decoder linears'), or None to keep it in 16-bit."""
        if self.lm_head_bits is None:
            return None
        group = self.group_size if self.lm_head_group_size is None else self.lm_head_group_size
        return WeightScheme(bits=self.lm_head_bits, group_size=group, symmetric=self.symmetric)

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        if self.dtype == "auto":
            return checkpoint_dtype if checkpoint_dtype in DTYPES.values() else torch.bfloat16
        return DTYPES[self.dtype]


def resolve_device(device: str) -> torch.device:
    """``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``, ``cuda:N``; a clear error for a name
    torch does not know or CUDA that is not there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r} is not a torch device ({e}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here; use --device cpu")
    return dev


def make_config(**fields) -> QuantizeConfig:
    """Build a :class:`QuantizeConfig`, turning pydantic's validation errors into a ConfigError."""
    try:
        return QuantizeConfig(**fields)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in e.errors())
        raise ConfigError(msgs) from None


def as_config(config: QuantizeConfig | Mapping[str, Any] | None) -> QuantizeConfig:
    """``config`` as a :class:`QuantizeConfig`: None gives the defaults, a mapping is validated as
    :func:`make_config` validates keyword arguments."""
    if config is None:
        return QuantizeConfig()
    if isinstance(config, QuantizeConfig):
        return config
    if isinstance(config, Mapping):
        return make_config(**config)
    raise ConfigError(f"config must be a QuantizeConfig (vlmptq.make_config(method=..., bits=...)) or a dict of its "
                      f"fields, not {type(config).__name__}")
