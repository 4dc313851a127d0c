"""Model adapters (registry keyed by ``config.model_type``)."""

from vlmptq.models.adapters import ADAPTERS, ModelAdapter, adapter_for_model, load_model, register_adapter

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for_model", "load_model", "register_adapter"]
