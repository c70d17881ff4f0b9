# Two commands on a fresh clone:  make demo  |  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean gpu-test

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# torch first: on a machine without a GPU the CPU build (a bare `torch` would pull a multi-GB CUDA build).
	@# Set TORCH_INDEX=https://download.pytorch.org/whl/cpu to force the CPU wheel where PyPI serves CUDA ones.
	@if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "torch>=2.6,<2.15"; \
	 elif [ -n "$(TORCH_INDEX)" ]; then $(BIN)/pip install -q torch==2.13.0 --index-url "$(TORCH_INDEX)"; \
	 else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[test,video]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/internvl-lora demo --out demo_out

test: $(STAMP)
	@bash .ci/install-chromium.sh || echo "chromium not installed: the report screenshot test will be skipped"
	$(BIN)/python -m pytest -q

# The inner loop: everything but the tests marked slow (long end-to-end runs), under 2 minutes on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

gpu-test: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) demo_out .pytest_cache
