"""Reading and writing compressed-tensors ``pack-quantized`` checkpoints.

Submodules are imported lazily by their users; ``packing`` depends on torch alone so the serving
plugin and the GPU kernels can use it without the quantizer's other dependencies.
"""
