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
             "hydra-core>=1.3" tqdm pandas matplotlib seaborn nbformat nbconvert nbclient ipykernel
TEX_DEBS  := latexmk texlive-latex-base texlive-latex-recommended texlive-fonts-recommended texlive-latex-extra
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

.PHONY: help all env test unit bench tune experiments figures paper tex clean

help: ## list the targets
	@grep -E '^[a-z][a-zA-Z_-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# on a GPU the paper is built from this GPU's set (RESULTS=... picks another), whose newest
# version of each file is the run just made: an existing result stays, the rerun is written
# beside it with a timestamp, and the notebooks read the newest (FORCE=1 replaces instead)
all: unit ## environment, tests, experiments and bench (on a CUDA GPU), figures and the PDF
	@if [ "$(HAS_GPU)" = "1" ]; then $(MAKE) --no-print-directory experiments bench || exit 1; \
	  $(MAKE) --no-print-directory paper RESULTS=$(or $(RESULTS),$$($(PY) -c "from tiny_gemm import timing; print(timing.results_dir())")); \
	else echo "no CUDA GPU: experiments skipped; figures and PDF from the committed results ($(or $(RESULTS),the most complete set under results/))"; \
	  $(MAKE) --no-print-directory paper; fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH) $(DEPS)
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

env: $(ENV) ## create .venv and install the dependencies (skipped when PYTHON=... is given)

test: unit paper ## the test suite, then the notebooks on the committed results and the PDF

unit: $(ENV) ## the test suite only (interpreter on CPU; GPU tests too where CUDA is present)
	@if [ "$(HAS_GPU)" = "1" ]; then \
	  echo "CUDA GPU found: compiled kernels, GPU tests included"; \
	  $(PY) -m pytest -q tests $(PYTEST_ARGS); \
	else \
	  echo "no CUDA GPU: Triton kernels under TRITON_INTERPRET=1, GPU tests skipped"; \
	  TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 -p no:warnings tests $(PYTEST_ARGS); \
	fi

# FORCE=1 (bench, experiments) replaces existing results of this GPU; else new ones are
# written beside them, timestamped
FORCE       ?=
bench: $(ENV) ## time W4A16 against cuBLAS FP16 and tinygemm on this GPU -> results/<gpu>/
	$(PY) experiments/bench_w4a16.py $(if $(FORCE),--force)

# each experiment runs on its config's shape family unless SHAPES names one
EXPERIMENTS ?= int4_vs_fp16 splitk_vs_dp dequant_breakdown roofline attention_fusion ffn_fusion
SHAPES      ?=
experiments: $(ENV) ## run the Hydra experiments (EXPERIMENTS=..., SHAPES=...) -> results/<gpu>/
	@if [ "$(HAS_GPU)" != "1" ]; then echo "no CUDA GPU: experiments skipped; the committed results are in results/"; \
	else for e in $(EXPERIMENTS); do $(PY) experiments/run.py experiment=$$e $(if $(SHAPES),shapes=$(SHAPES)) $(if $(FORCE),force=true) || exit 1; done; fi

# RESULTS=results/<gpu> picks a results set; by default the most complete one (most experiments, newest on a tie)
RESULTS ?=
figures: $(ENV) ## execute the notebooks on a results set -> paper/figures/, paper/generated/
	@mkdir -p paper/build/notebooks
	cd notebooks && for nb in *.ipynb; do \
	  TINY_GEMM_RESULTS=$(RESULTS) $(abspath $(PY)) -m jupyter nbconvert --log-level WARN --to notebook \
	    --execute --output-dir ../paper/build/notebooks $$nb || exit 1; done

paper: figures tex ## build the paper -> paper/build/main.pdf
	cd paper && latexmk -pdf -interaction=nonstopmode -halt-on-error -outdir=build main.tex > build/latexmk.log 2>&1 \
	  || { tail -40 build/latexmk.log; exit 1; }
	@echo "paper/build/main.pdf"

tex: ## make sure latexmk and pdflatex exist (installs Debian's TeX when root with apt-get)
	@if command -v latexmk >/dev/null && command -v pdflatex >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing TeX: $(TEX_DEBS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEX_DEBS) >/dev/null; \
	else echo "latexmk/pdflatex missing: install them, e.g. sudo apt-get install $(TEX_DEBS)"; exit 1; fi

tune: $(ENV) ## search launch configs on this GPU: W4A16 for every shape in conf/shapes/ (and each joined gate/up) -> kernels/tiny_gemm/configs/<gpu>.json; decode attention over attention_fusion's batch x context grid -> configs/decode/<gpu>.json
	$(PY) experiments/tune_w4a16.py
	$(PY) experiments/tune_decode.py

clean: ## remove caches and build outputs (keeps .venv and results)
	rm -rf .pytest_cache .hypothesis build kernels/*.egg-info paper/build paper/figures paper/generated
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
