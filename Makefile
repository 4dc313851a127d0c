# The two commands (see README):
#   make demo   quantize the built-in demo VLM, serve it with vLLM, ask it about a photo
#   make test   the whole test suite (CPU; GPU tests skip without CUDA)
# Both create/update .venv first (scripts/setup_venv.sh: pinned versions, offline-capable here).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Caches, sockets and temp files stay inside the project (vLLM, torch.compile, HF).
export VLLM_CACHE_ROOT := $(CURDIR)/.cache/vllm
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export HF_HOME := $(CURDIR)/.cache/hf
export HF_HUB_OFFLINE := 1
export TMPDIR := $(CURDIR)/.tmp
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv clean

venv:
	@mkdir -p .cache .tmp
	@VENV=$(VENV) bash scripts/setup_venv.sh

demo: venv
	$(PY) -m vlmptq.demo

# One OpenMP thread: on 2 shared cores, more threads thrash (docs/environment.md); the vLLM CPU
# engine binds its own.
test: export OMP_NUM_THREADS ?= 1
test: venv
	$(PY) -m pytest -q -ra -n 2 $(PYTEST_ARGS)

clean:
	rm -rf .cache .tmp demo-out
