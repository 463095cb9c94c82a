# Set-up is idempotent: each target (re)uses its venv and installs only what changed.
# `make` installs exactly the versions in requirements/lock.txt, the ones the suite last passed with;
# pyproject.toml keeps ranges for users who `pip install` the package. `make test-latest` tries the newest
# versions those ranges allow in a separate venv, and `make lock` records them once they pass.
#
# Every Python started from here runs with the safe path, so the checkout's top-level folders (kernels/,
# callbacks/, configs/, benchmarks/, tests/) never shadow installed packages of the same name.
export PYTHONSAFEPATH := 1

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LATEST_VENV := .venv-latest
LOCK := requirements/lock.txt
TORCH_VERSION := 2.13.0
# On a machine without an NVIDIA GPU torch is the CPU build: PyPI's plain wheel is the CUDA one, with
# several GB of CUDA libraries. The local version tag (+cpu) names the CPU wheel; pip takes it from the
# places it is configured to look, else from PyTorch's CPU index.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
NVIDIA_SMI := $(shell command -v nvidia-smi 2>/dev/null)
TORCH := torch==$(TORCH_VERSION)$(if $(NVIDIA_SMI),,+cpu)
EXTRAS := .[test,bench,lint]
# megatron-core is only a test reference for the indexed-dataset format; its own deps are not needed.
MEGATRON := megatron-core>=0.9
# 2.6 is the first release that registers its kernels as torch operators (selective checkpointing names them).
FLASH_ATTN := flash-attn>=2.6
PYTEST := -m pytest -q -x -p no:cacheprovider -n 2 --dist loadfile

.PHONY: venv flash-attn demo test test-fast test-shuffled test-latest lock bench lint clean

# $(call install,VENV,PIP OPTIONS): torch first (so no requirement pulls another build), then the rest.
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q "$(TORCH)" \
		|| $(1)/bin/python -m pip install -q --index-url $(TORCH_CPU_INDEX) "$(TORCH)"
	$(1)/bin/python -m pip install -q $(2) -e "$(EXTRAS)" "$(TORCH)"
	$(1)/bin/python -m pip install -q $(2) --no-deps "$(MEGATRON)"
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(call install,$(VENV),--constraint $(LOCK))
ifneq ($(NVIDIA_SMI),)
	$(MAKE) --no-print-directory flash-attn
endif
	touch $@

venv: $(VENV)/.installed

# flash-attn's build imports torch, so it is built without build isolation, against the torch installed here
# (a wheel built against another torch does not load). When it cannot be built or loaded, set-up goes on and
# CUDA attention runs FlexAttention (compiled).
flash-attn:
	$(PY) -m pip install -q packaging ninja psutil wheel setuptools
	if MAX_JOBS=$${MAX_JOBS:-4} $(PY) -m pip install --no-build-isolation "$(FLASH_ATTN)" \
			&& $(PY) -c "import flash_attn"; then \
		echo "make: flash-attn installed; CUDA attention runs its kernels"; \
	else \
		echo "make: flash-attn could not be built or loaded against this torch (see above);" \
			"CUDA attention runs FlexAttention"; \
	fi

demo: $(VENV)/.installed
	$(PY) -m mistral_lightning.demo

# One thread per process: the two xdist workers, and the ranks and runs they start, share 2 cores, and
# torch's default of a thread per core oversubscribed them (the suite took 8 min 1 s, 7 min 23 s with one).
test test-fast test-shuffled test-latest: export OMP_NUM_THREADS := 1

test: $(VENV)/.installed
	$(PY) $(PYTEST) tests

# The inner loop: no test that starts a process or a server.
test-fast: $(VENV)/.installed
	$(PY) $(PYTEST) -m "not processes" tests

# The suite in a shuffled order: a new seed each run, printed; `make test-shuffled SEED=N` repeats one.
SEED ?= $(shell date +%s)
test-shuffled: $(VENV)/.installed
	@echo "make: shuffled with SEED=$(SEED)"
	$(PY) $(PYTEST) --random-order-bucket=global --random-order-seed=$(SEED) tests

# The newest versions pyproject.toml allows, in their own venv: an upstream release shows up here first.
test-latest:
	rm -f $(LATEST_VENV)/.passed
	$(call install,$(LATEST_VENV),--upgrade --upgrade-strategy eager)
	$(LATEST_VENV)/bin/python $(PYTEST) tests
	touch $(LATEST_VENV)/.passed

# Record what passed test-latest as the lock every other target installs (torch is pinned above, per device).
lock: $(LATEST_VENV)/.passed
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable \
		| grep -viE '^((torch|triton)==|nvidia-|cuda-)' > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

bench: $(VENV)/.installed
	$(PY) -m mistral_lightning.benchmarks.run

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check mistral_lightning kernels callbacks benchmarks tests
	$(VENV)/bin/ruff format --check mistral_lightning kernels callbacks benchmarks tests
	# The layers contract reads an installed copy: kernels/ and callbacks/ join the package only at install.
	rm -rf build/import-graph
	$(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation --target build/import-graph .
	cd build/import-graph && PYTHONPATH=. $(abspath $(VENV))/bin/lint-imports --config $(CURDIR)/pyproject.toml

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info
