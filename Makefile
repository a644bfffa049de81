# Tiny-GEMM: `make help` lists the targets.
#
# On a CPU-only machine `make test` builds .venv (torch 2.13.0 CPU build, triton, pytest) and
# runs every Triton kernel under the interpreter (TRITON_INTERPRET=1). Where torch and triton
# with CUDA are already installed (a GPU machine), pass that interpreter instead:
#     make test PYTHON=python3        # runs the GPU tests too
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
TORCH     := torch==2.13.0
DEPS      := "triton==3.6.0" "numpy<2.4" "pytest>=8" "hypothesis>=6.100" pytest-xdist \
             "hydra-core>=1.3" tqdm
ifeq ($(origin PYTHON), undefined)
  PY  := $(VENV)/bin/python
  ENV := $(VENV)/.installed
else
  PY  := $(PYTHON)
  ENV :=
endif
export PYTHONPATH := $(CURDIR)/kernels$(if $(PYTHONPATH),:$(PYTHONPATH))
HAS_GPU    = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: help all env test bench tune experiments clean

help: ## list the targets
	@grep -E '^[a-z][a-zA-Z_-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

all: test ## environment and tests; on a CUDA GPU also the benchmark -> results/<gpu>/
	@if [ "$(HAS_GPU)" = "1" ]; then $(MAKE) --no-print-directory bench; \
	else echo "no CUDA GPU: benchmark skipped; the committed results are in results/"; fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH) $(DEPS)
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

env: $(ENV) ## create .venv and install the dependencies (skipped when PYTHON=... is given)

test: $(ENV) ## run the test suite (interpreter on CPU; GPU tests too where CUDA is present)
	@if [ "$(HAS_GPU)" = "1" ]; then \
	  echo "CUDA GPU found: compiled kernels, GPU tests included"; \
	  $(PY) -m pytest -q tests $(PYTEST_ARGS); \
	else \
	  echo "no CUDA GPU: Triton kernels under TRITON_INTERPRET=1, GPU tests skipped"; \
	  TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 -p no:warnings tests $(PYTEST_ARGS); \
	fi

bench: $(ENV) ## time W4A16 against cuBLAS FP16 and tinygemm on this GPU -> results/<gpu>/
	$(PY) experiments/bench_w4a16.py

# each experiment runs on its config's shape family unless SHAPES names one
EXPERIMENTS ?= int4_vs_fp16 splitk_vs_dp
SHAPES      ?=
experiments: $(ENV) ## run the Hydra experiments (EXPERIMENTS=..., SHAPES=...) -> results/<gpu>/
	@if [ "$(HAS_GPU)" != "1" ]; then echo "no CUDA GPU: experiments skipped; the committed results are in results/"; \
	else for e in $(EXPERIMENTS); do $(PY) experiments/run.py experiment=$$e $(if $(SHAPES),shapes=$(SHAPES)) || exit 1; done; fi

tune: $(ENV) ## search launch configs on this GPU -> kernels/tiny_gemm/configs/<gpu>.json
	$(PY) experiments/tune_w4a16.py

clean: ## remove caches and build outputs (keeps .venv and results)
	rm -rf .pytest_cache .hypothesis build kernels/*.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
