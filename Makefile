# The README's two commands: `make demo` and `make test`. Each creates or reuses .venv and installs
# what it needs first (CPU torch from the local 2.13.0 wheel when no CUDA GPU is present).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vmla-installed
# pytest-xdist workers of `make test` (the Slurm tests share one: tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "CUDA GPU found: installing torch from the package index"; \
	else \
	  echo "no CUDA GPU: installing the CPU torch wheel (torch==2.13.0)"; \
	  $(BIN)/python -m pip install -q torch==2.13.0; \
	fi
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

demo: $(STAMP)
	$(BIN)/vmla-train demo configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup

clean:
	rm -rf $(VENV) runs .pytest_cache
