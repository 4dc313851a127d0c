"""Quantization schemes, grids and the quantized-weight container."""

from vlmptq.quant.qweight import QuantizedWeight
from vlmptq.quant.scheme import WeightScheme

__all__ = ["QuantizedWeight", "WeightScheme"]
