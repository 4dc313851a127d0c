"""The built-in demo (``python -m vlmptq.demo``, ``make demo``) and what it measures.

``vlmptq.demo.evaluate``: KL of a quantized VLM from the unquantized one on held-out photo prompts.
The server is started and stopped by ``vlmptq.server.VllmServer``.
"""
