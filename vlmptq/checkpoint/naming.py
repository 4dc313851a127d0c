"""Model-space names -> on-disk (original checkpoint) names, with transformers' own machinery.

transformers 5 loads checkpoints through "weight conversions": renamings (``visual.*`` ->
``model.visual.*``, ``model.layers.*`` -> ``model.language_model.layers.*``) and converters that
reshape tensors (fuse MoE experts, split qkv, ...). ``save_pretrained`` reverts them with
``revert_weight_conversion``; we do the same for the tensors, and use the same reverse transforms,
key by key, to (a) learn the on-disk name of every module (for ``ignore``) and (b) refuse to save
when a converter (not a plain renaming) would act on a quantized tensor: converters reshape or
merge tensors and would corrupt packed integers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from vlmptq.errors import CheckpointError


@dataclass(frozen=True)
class DiskName:
    name: str
    converter: str | None  # source pattern of the non-rename converter that matched, if any


def _reverse_transforms(model: torch.nn.Module):
    """The reverse renamings and converters ``revert_weight_conversion`` applies to ``model``.

    Mirrors the start of ``transformers.core_model_loading.revert_weight_conversion`` (5.x).
    """
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = get_model_conversion_mapping(model, add_legacy=False)
        conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    # reverse_transform() builds fresh objects, so matching below never mutates the model's own.
    reverse = [c.reverse_transform() for c in list(conversions)[::-1]]
    renamings = [t for t in reverse if isinstance(t, WeightRenaming)]
    converters = [t for t in reverse if isinstance(t, WeightConverter)]
    return renamings, converters


def disk_names(model: torch.nn.Module, keys: Iterable[str]) -> dict[str, DiskName]:
    """On-disk name of each model-space state-dict key, in the order transformers processes them."""
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    renamings, converters = _reverse_transforms(model)
    out: dict[str, DiskName] = {}
    for key in sorted(keys, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, reverse=True)
        out[key] = DiskName(name=name, converter=pattern)
    return out


def module_disk_names(
    model: torch.nn.Module, modules: Iterable[str], state_keys: Iterable[str]
) -> dict[str, str]:
    """On-disk names of (ignored) modules, through their ``<module>.weight`` key.

    ``state_keys`` are all the model's state-dict keys (renamings can depend on key order).
    """
    modules = list(modules)
    keys = set(state_keys) | {f"{m}.weight" for m in modules}
    names = disk_names(model, keys)
    out = {}
    for m in modules:
        d = names[f"{m}.weight"]
        if d.converter is not None or not d.name.endswith(".weight"):
            raise CheckpointError(
                f"module {m!r}: transformers converts its weight with {d.converter!r} when saving, so it has "
                f"no single on-disk module name for the ignore list; this architecture is not supported."
            )
        out[m] = d.name[: -len(".weight")]
    return out


def check_no_converter(model: torch.nn.Module, modules: Iterable[str], keys: Iterable[str]) -> None:
    """Raise if a non-rename weight converter would act on a quantized module's tensors."""
    modules = set(modules)
    for key, d in disk_names(model, keys).items():
        module = key.rpartition(".")[0]
        if module in modules and d.converter is not None:
            raise CheckpointError(
                f"cannot save {key!r} quantized: transformers converts it on save with the weight "
                f"converter {d.converter!r} (it reshapes or merges tensors, which would corrupt packed "
                f"codes). Leave module {module!r} in 16 bit (add it to ignore)."
            )
