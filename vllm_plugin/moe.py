"""Mixture-of-experts layers of vlmptq checkpoints in vLLM: vlmptq's fused Triton kernel, vLLM's own MoE kernels,
or a torch reference, whichever fits the scheme and platform first.

vLLM serves a block's experts as one ``RoutedExperts`` layer (gate/up fused as ``w13``, down as ``w2``) with one
scheme. The checkpoint holds them per expert (``experts.{e}.gate_proj.weight_packed`` ...), as compressed-tensors
writes them. :func:`experts_method` picks, per block:

1. :class:`VlmptqFusedMoEMethod` for 2 and 3-bit SiLU- or tanh-GELU-gated experts on a CUDA GPU (sm80+, bf16/fp16,
   groups that are multiples of 32 or per-channel; passes its first-use self-check): the grouped Triton kernel of
   :mod:`vllm_plugin.kernels.triton.moe`, CUDA-graph safe;
2. vLLM's compressed-tensors MoE method, where vLLM has a kernel for the scheme on this platform (GPU: Marlin /
   Triton WNA16 for 4 and 8 bits; CPU with AMX tiles: symmetric 4-bit, group size other than 32, int8 activations;
   not on a CPU for blocks that weigh the experts' input, Llama 4's, which vLLM's CPU int4 experts refuse at the
   first forward);
3. the fused method for any other scheme it takes (e.g. 4-bit schemes vLLM lacks a kernel for);
4. :class:`VlmptqReferenceMoEMethod` for the rest (the CPU's 2/3-bit and asymmetric 4-bit experts): exact, slow
   (each routed expert dequantized per call); on a GPU it needs ``--enforce-eager`` (a host loop).

``VLMPTQ_DISABLED_KERNELS=triton_moe`` removes step 1 and 3. Both vlmptq methods shard experts by tensor
parallelism (each rank keeps its slice of the intermediate features, cut from the checkpoint's full tensors
at load) and refuse expert parallelism.

Checkpoint layout as loaded (one partition; ``E`` experts, ``H`` hidden, ``I`` this rank's intermediate features,
``b`` bits, groups along K):
    w13_weight_packed      int32 [E, 2, I, ceil(H*b/32)]   shard 0 gate_proj, 1 up_proj; packed along K
    w13_weight_scale             [E, 2, I, H/g]
    w13_weight_zero_point  int32 [E, 2, ceil(I*b/32), H/g] packed along N (asymmetric only)
    w2_weight_packed       int32 [E, H, ceil(I*b/32)]
    w2_weight_scale              [E, H, I/g]
    w2_weight_zero_point   int32 [E, ceil(H*b/32), I/g]
Each expert's tensors stay as the checkpoint packs them (gate and up apart: packed zero points of two
projections do not concatenate word-exactly at 3 bits); the old padded 3-bit layout is converted on load. The
fused method then repacks them into the kernel layout (``w13_qweight``, ``w13_sz``, ``w2_qweight``, ``w2_sz``:
see :mod:`vllm_plugin.kernels.triton.moe`) and drops them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from vlmptq.checkpoint.packing import (
    dense_width,
    pack_columns,
    pack_rows,
    unpack_columns,
    unpack_rows,
    unpack_rows_padded3,
)
from vlmptq.errors import CheckpointError, ConfigError
from vlmptq.models.experts import mix_routed
from vllm_plugin.kernels.reference import dequantize_packed
from vllm_plugin.kernels.triton.moe import ACTIVATIONS, FUSED_ACTIVATIONS
from vllm_plugin.validation import PartitionError, ServingScheme, check_tensor

logger = logging.getLogger(f"vllm.plugins.{__name__}")

_SHARD = {"w1": 0, "w3": 1}  # vLLM's shard ids of gate_proj and up_proj within w13
_PROJECTION = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def experts_method(layer: torch.nn.Module, prefix: str, scheme: ServingScheme, stock_config: Any
                   ) -> FusedMoEMethodBase:
    """The method serving ``layer``'s experts (module docstring: the order)."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        CompressedTensorsMoEMethod,
    )
    from vllm.platforms import current_platform

    moe = layer.moe_config
    if scheme.bits < 4:
        fused, why_not = fused_verdict(moe, scheme)
        if fused:
            logger.info("vlmptq: %s (%s experts) served by vlmptq's fused Triton MoE kernel", prefix,
                        scheme.describe())
            return VlmptqFusedMoEMethod(moe, scheme, prefix)
    if getattr(layer, "apply_router_weight_on_input", False) and current_platform.is_cpu():
        # vLLM 0.32's CPU int4 experts raise at the first forward on such a block (Llama 4)
        stock = "its CPU MoE kernels do not take the routing weight on the experts' input"
    else:
        try:
            method = CompressedTensorsMoEMethod.get_moe_method(stock_config, layer, layer_name=prefix)
            logger.info("vlmptq: %s (%s experts) served by vLLM's %s", prefix, scheme.describe(),
                        type(method).__name__)
            return method
        except (NotImplementedError, KeyError, ValueError) as e:
            stock = str(e).splitlines()[0] if str(e) else type(e).__name__
    if scheme.bits >= 4:  # vLLM had no kernel: only now is the fused kernel's check worth its cost
        fused, why_not = fused_verdict(moe, scheme)
    if fused:
        logger.info("vlmptq: %s (%s experts) served by vlmptq's fused Triton MoE kernel (vLLM has none: %s)",
                    prefix, scheme.describe(), stock)
        return VlmptqFusedMoEMethod(moe, scheme, prefix)
    logger.warning("vlmptq: neither vLLM (%s) nor vlmptq's fused kernel (%s) takes %s experts here; %s is served by "
                   "vlmptq's torch reference: exact but slow (every routed expert is dequantized per call)",
                   stock, why_not, scheme.describe(), prefix)
    return VlmptqReferenceMoEMethod(moe, scheme, prefix)


def fused_verdict(moe, scheme: ServingScheme) -> tuple[bool, str | None]:
    """(True, None) if :class:`VlmptqFusedMoEMethod` can serve experts of ``scheme`` in the block ``moe`` (a
    vLLM ``FusedMoEConfig``) here, else (False, why): the Triton kernels' needs for both projections, gated
    experts without biases, and, once per scheme and device, the fused path's self-check."""
    from vllm.platforms import current_platform

    from vllm_plugin.kernels import DISABLED_KERNELS_ENV, disabled_kernels
    from vllm_plugin.kernels.base import WNA16LayerConfig
    from vllm_plugin.kernels.triton.selfcheck import SELF_CHECK_ENV, self_check, self_check_enabled
    from vllm_plugin.kernels.triton_wna16 import SUPPORTED_BITS, triton_reasons

    if "triton_moe" in disabled_kernels():
        return False, f"disabled by {DISABLED_KERNELS_ENV}"
    reasons = [] if scheme.bits in SUPPORTED_BITS else [f"{scheme.bits}-bit weights (takes {SUPPORTED_BITS})"]
    h, i = moe.hidden_dim, moe.intermediate_size_per_partition
    for n, k in ((2 * i, h), (h, i)):
        reasons += triton_reasons(WNA16LayerConfig(scheme.bits, scheme.group_len(k), scheme.symmetric, k, n,
                                                   moe.in_dtype, current_platform.device_type))
    if not moe.is_act_and_mul or moe.activation.value not in FUSED_ACTIVATIONS:
        reasons.append(f"activation {moe.activation.value} (takes gated {' / '.join(FUSED_ACTIVATIONS)})")
    if moe.has_bias or getattr(moe, "swiglu_limit", None) is not None:
        reasons.append("experts with biases or a clamped SwiGLU")
    if reasons:
        return False, "; ".join(dict.fromkeys(reasons))
    if self_check_enabled():
        group = None if scheme.group_size == -1 else scheme.group_size
        failed = self_check(scheme.bits, group, moe.in_dtype, torch.cuda.current_device(), "triton_moe")
        if failed:
            return False, f"failed its self-check on this GPU ({failed}; {SELF_CHECK_ENV}=0 skips the check)"
    return True, None


class VlmptqReferenceMoEMethod(FusedMoEMethodBase):
    """Weight-only 2/3/4/8-bit experts, any group size, symmetric or not: see the module docstring."""

    def __init__(self, moe, scheme: ServingScheme, prefix: str):
        super().__init__(moe)
        self.scheme, self.prefix = scheme, prefix
        self._loaded: set[tuple[str, int, int]] = set()

    # ------------------------------------------------------------------ weights
    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        moe = self.moe
        par = moe.moe_parallel_config
        if par.use_ep:
            raise ConfigError(
                f"{self.prefix}: vlmptq's MoE paths shard experts by tensor parallelism, not expert parallelism; "
                "serve without --enable-expert-parallel, or quantize the experts at 4 bits, which vLLM's own MoE "
                "kernels take")
        self.tp = (par.tp_rank, par.tp_size)
        self._check_tp(intermediate_size_per_partition)
        self._check_serving()
        if not moe.is_act_and_mul or moe.activation.value not in ACTIVATIONS:
            raise ConfigError(f"{self.prefix}: vlmptq's MoE paths serve gated experts (act(gate) * up) "
                              f"with {' / '.join(ACTIVATIONS)}, not {moe.activation.value}")
        e, h, i, s = num_experts, hidden_size, intermediate_size_per_partition, self.scheme
        self.dims = {"w13": (i, h), "w2": (h, i)}  # (N, K) of each projection
        self.activation = moe.activation.value
        shapes = {
            "w13": {"weight_packed": (e, 2, i, dense_width(h, s.bits)), "weight_scale": (e, 2, i, self._groups(h)),
                    "weight_zero_point": (e, 2, dense_width(i, s.bits), self._groups(h)), "weight_shape": (e, 2, 2)},
            "w2": {"weight_packed": (e, h, dense_width(i, s.bits)), "weight_scale": (e, h, self._groups(i)),
                   "weight_zero_point": (e, dense_width(h, s.bits), self._groups(i)), "weight_shape": (e, 2)},
        }
        for proj, tensors in shapes.items():
            for t, shape in tensors.items():
                if t == "weight_zero_point" and s.symmetric:
                    continue
                dtype = params_dtype if t == "weight_scale" else torch.int64 if t == "weight_shape" else torch.int32
                param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
                layer.register_parameter(f"{proj}_{t}", param)
                set_weight_attrs(param, {"weight_loader": self._loader(proj, t)})
        self.expected = {(f"{proj}_{t}", x, k) for proj in shapes for t in shapes[proj]
                         if not (t == "weight_zero_point" and s.symmetric)
                         for x in range(e) for k in ((0, 1) if proj == "w13" else (0,))}

    def _check_serving(self) -> None:
        _check_eager(self.prefix)

    def _check_tp(self, inter: int) -> None:
        """Each rank holds ``inter`` of the experts' intermediate features: down's input slice must be whole
        groups (unlike :func:`vllm_plugin.validation.validate_partition`, not whole packed words: the loader
        unpacks and repacks its slice)."""
        size = self.tp[1]
        g = self.scheme.group_size
        if size > 1 and g != -1 and inter % g:
            raise PartitionError(
                f"{self.prefix}: tensor parallel {size} gives each rank {inter} of the experts' {inter * size} "
                f"intermediate features, not a whole number of group_size={g} groups (down_proj's scales cannot be "
                f"split there); serve with a tensor-parallel size that divides {inter * size // g}")

    def _groups(self, k: int) -> int:
        glen = self.scheme.group_len(k)
        if k % glen:
            raise ConfigError(f"{self.prefix}: {k} input features are not divisible by group_size={glen}")
        return k // glen

    def _loader(self, proj: str, tensor: str):
        def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, weight_name: str = "", shard_id: str = "",
                 expert_id: int = 0, return_success: bool = False, **_: Any) -> bool | None:
            shard = _SHARD.get(shard_id, 0)
            n, k = self._full_dims(proj)
            value = loaded_weight
            name = f"{self.prefix}.{expert_id}.{_PROJECTION.get(shard_id, shard_id)}.{tensor}"  # the checkpoint's
            if tensor != "weight_shape":
                padded3 = check_tensor(name, tensor, tuple(value.shape), self.scheme, n, k)
                if padded3:  # the old 3-bit layout: 10 codes per word -> dense
                    if tensor == "weight_packed":
                        value = pack_rows(unpack_rows_padded3(value, k), 3)
                    else:
                        value = pack_rows(unpack_rows_padded3(value.t().contiguous(), n), 3).t().contiguous()
                value = self._rank_slice(proj, tensor, value)
            elif value.tolist() != [n, k]:
                raise CheckpointError(f"{name}: {value.tolist()}, but the layer's projection is {[n, k]}")
            target = param.data[expert_id, shard] if proj == "w13" else param.data[expert_id]
            target.copy_(value.to(target.dtype))
            self._loaded.add((f"{proj}_{tensor}", expert_id, shard))
            return True if return_success else None

        return load

    def _full_dims(self, proj: str) -> tuple[int, int]:
        """(N, K) of the checkpoint's projection: the intermediate features of every rank."""
        n, k = self.dims[proj]
        size = self.tp[1]
        return (n * size, k) if proj == "w13" else (n, k * size)

    def _rank_slice(self, proj: str, tensor: str, value: torch.Tensor) -> torch.Tensor:
        """This rank's part of a checkpoint tensor (validated, dense layout): gate/up keep rows (outputs)
        ``[r*I_p, (r+1)*I_p)``, down keeps those inputs. Packed dimensions are unpacked, cut and packed again, so
        any boundary works (3-bit words included)."""
        rank, size = self.tp
        if size == 1:
            return value
        bits = self.scheme.bits
        n, k = self.dims[proj]
        if proj == "w13":
            if tensor == "weight_zero_point":
                return pack_columns(unpack_columns(value, bits, n * size)[rank * n:(rank + 1) * n], bits)
            return value[rank * n:(rank + 1) * n]
        if tensor == "weight_packed":
            return pack_rows(unpack_rows(value, bits, k * size)[:, rank * k:(rank + 1) * k], bits)
        groups = value.shape[1]
        if groups == 1:  # per-channel: every input slice has the row's one scale / zero point
            return value
        return value[:, rank * groups // size:(rank + 1) * groups // size]

    def process_weights_after_loading(self, layer) -> None:
        missing = sorted(self.expected - self._loaded)
        if missing:
            name, e, shard = missing[0]
            proj = {("w13", 0): "gate_proj", ("w13", 1): "up_proj"}.get((name[:3], shard), "down_proj")
            needed = [t for t in _TENSORS if not (t == "weight_zero_point" and self.scheme.symmetric)]
            raise CheckpointError(
                f"{self.prefix}: {len(missing)} expert tensor(s) missing from the checkpoint, e.g. expert {e}'s "
                f"{proj}.{name.partition('_')[2]}; every expert projection needs {', '.join(needed)}")

    def get_fused_moe_quant_config(self, layer) -> None:
        return None

    # ------------------------------------------------------------------ forward
    def _weight(self, layer, proj: str, e: int, shard: int | None) -> torch.Tensor:
        def part(t: str) -> torch.Tensor | None:
            p = getattr(layer, f"{proj}_{t}", None)
            if p is None:
                return None
            return p[e] if shard is None else p[e, shard]

        return dequantize_packed(part("weight_packed"), part("weight_scale"), part("weight_zero_point"),
                                 self.scheme.bits, self.dims[proj][1])

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            w13 = torch.cat((self._weight(layer, "w13", e, 0), self._weight(layer, "w13", e, 1)))
            gate, up = F.linear(rows, w13.to(x.dtype)).chunk(2, dim=-1)
            return F.linear(ACTIVATIONS[self.activation](gate) * up, self._weight(layer, "w2", e, None).to(x.dtype))

        # shared experts, if any, are the runner's (it runs them when the method has no modular kernel)
        return mix_routed(x, topk_ids, topk_weights, layer.w13_weight_packed.shape[0], expert,
                          weight_on_input=_weight_on_input(layer, topk_ids))


def _weight_on_input(layer, topk_ids: torch.Tensor) -> bool:
    """Whether the block scales each expert's input by its routing weight instead of its output (Llama 4:
    vLLM's ``apply_router_weight_on_input``, defined for one expert per token only)."""
    on_input = bool(getattr(layer, "apply_router_weight_on_input", False))
    if on_input and topk_ids.shape[-1] != 1:
        raise ConfigError(f"routing weights applied to the experts' input need one expert per token; this block "
                          f"routes each token to {topk_ids.shape[-1]}")
    return on_input


def _check_eager(prefix: str) -> None:
    """The reference loops over the routed experts on the host (a device sync per call), which CUDA graphs and
    torch.compile cannot capture: on a GPU it needs an eager engine."""
    from vllm.config import get_current_vllm_config_or_none
    from vllm.platforms import current_platform

    config = get_current_vllm_config_or_none()
    eager = config is None or config.model_config is None or config.model_config.enforce_eager
    if current_platform.is_cuda_alike() and not eager:
        raise ConfigError(
            f"{prefix}: neither vLLM's MoE kernels nor vlmptq's fused one take these experts here (the log above "
            "says why), and vlmptq's reference MoE path (exact, slow) cannot run inside CUDA graphs: serve with "
            "--enforce-eager, or quantize the experts with a scheme a fast path takes (vlmptq's fused kernel: 2/3/4 "
            "bits, groups that are multiples of 32 or per-channel; vLLM's: 4 or 8 bits, e.g. vlmptq quantize ... "
            "--override 'mlp\\.experts\\.=4')")


class VlmptqFusedMoEMethod(VlmptqReferenceMoEMethod):
    """2/3/4-bit experts through vlmptq's grouped Triton kernel (:mod:`vllm_plugin.kernels.triton.moe`): loads
    like the reference, then repacks every expert into the kernel layout once; CUDA-graph safe."""

    def _check_serving(self) -> None:  # no host loop: CUDA graphs are fine
        pass

    def process_weights_after_loading(self, layer) -> None:
        super().process_weights_after_loading(layer)
        from vllm_plugin.kernels.triton.moe import repack_experts  # registers torch.ops.vlmptq.wna16_moe

        def shard(proj: str, e: int, k: int | None) -> tuple:
            parts = (getattr(layer, f"{proj}_{t}", None) for t in _TENSORS[:3])
            return tuple(None if p is None else (p[e] if k is None else p[e, k]) for p in parts)

        experts = layer.w13_weight_packed.shape[0]
        hidden, inter = self.dims["w2"]
        dt = self.moe.in_dtype
        w13 = repack_experts([[shard("w13", e, 0), shard("w13", e, 1)] for e in range(experts)], self.scheme.bits,
                             hidden, dt)
        w2 = repack_experts([[shard("w2", e, None)] for e in range(experts)], self.scheme.bits, inter, dt)
        for name in [n for n, _ in layer.named_parameters(recurse=False) if n.startswith(("w13_weight", "w2_weight"))]:
            delattr(layer, name)
        for name, t in zip(("w13_qweight", "w13_sz", "w2_qweight", "w2_sz"), (*w13, *w2)):
            layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
        logger.debug("vlmptq: %s repacked %d experts for the fused MoE kernel", self.prefix, experts)

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        if x.dtype != self.moe.in_dtype:
            raise TypeError(f"{self.prefix}: activations are {x.dtype}, the experts were prepared for "
                            f"{self.moe.in_dtype}")
        if _weight_on_input(layer, topk_ids):  # one expert per token: scale its input, then weigh its output by 1
            x, topk_weights = x * topk_weights.to(x.dtype), torch.ones_like(topk_weights)
        return torch.ops.vlmptq.wna16_moe(x, topk_ids, topk_weights, layer.w13_qweight, layer.w13_sz,
                                          layer.w2_qweight, layer.w2_sz, self.scheme.bits, self.activation)
