"""The built-in demo (``python -m vlmptq.demo``, ``make demo``) and what it measures.

``vlmptq.demo.evaluate``: KL of a quantized VLM from the unquantized one on held-out photo prompts.
``vlmptq.demo.serve``: start / stop a vLLM OpenAI-compatible server on a free local port.
"""
