# Set-up is idempotent: each target (re)uses .venv and installs only what is missing.
# On a CPU-only machine torch is pinned to the local CPU build so pip never pulls a CUDA wheel; on a GPU
# machine (nvidia-smi present) flash-attn is built against the installed torch as well.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0
# 2.6 is the first release that registers its kernels as torch operators (selective checkpointing names them).
FLASH_ATTN := flash-attn>=2.6
NVIDIA_SMI := $(shell command -v nvidia-smi 2>/dev/null)
STAMP := $(VENV)/.installed

.PHONY: venv flash-attn demo test bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install -q $(TORCH_CPU); fi
	$(PY) -m pip install -q -e ".[test,bench,lint]"
	# megatron-core is only a test reference for the indexed-dataset format; its own deps are not needed.
	$(PY) -m pip install -q --no-deps "megatron-core>=0.9"
ifneq ($(NVIDIA_SMI),)
	$(MAKE) --no-print-directory flash-attn
endif
	touch $(STAMP)

venv: $(STAMP)

# flash-attn's build imports torch, so it is built without build isolation, against the torch installed here
# (a wheel built against another torch does not load). When it cannot be built or loaded, set-up goes on and
# CUDA attention runs the portable SDPA path.
flash-attn: $(PY)
	$(PY) -m pip install -q packaging ninja psutil wheel setuptools
	if MAX_JOBS=$${MAX_JOBS:-4} $(PY) -m pip install --no-build-isolation "$(FLASH_ATTN)" \
			&& $(PY) -c "import flash_attn"; then \
		echo "make: flash-attn installed; CUDA attention runs its kernels"; \
	else \
		echo "make: flash-attn could not be built or loaded against this torch (see above);" \
			"CUDA attention runs the portable SDPA path"; \
	fi

demo: $(STAMP)
	$(PY) -m mistral_lightning.demo

test: $(STAMP)
	$(PY) -m pytest -q -x tests

bench: $(STAMP)
	$(PY) -m benchmarks.run

lint: $(STAMP)
	$(VENV)/bin/ruff check mistral_lightning kernels callbacks benchmarks tests
	$(VENV)/bin/ruff format --check mistral_lightning kernels callbacks benchmarks tests
	# The layers contract reads an installed copy: kernels/ and callbacks/ join the package only at install.
	rm -rf build/import-graph
	$(PY) -m pip install -q --no-deps --no-build-isolation --target build/import-graph .
	cd build/import-graph && PYTHONPATH=. $(abspath $(VENV))/bin/lint-imports --config $(CURDIR)/pyproject.toml

clean:
	rm -rf $(VENV) build *.egg-info
