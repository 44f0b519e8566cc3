# The two front-door commands (see README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out/demo
# The CPU wheel of torch that lies on this machine's disk. A GPU user passes the CUDA build instead,
# e.g. `make setup TORCH="torch==2.13.0 --index-url <PyTorch's CUDA wheel index>"`.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint

# torch comes through pip (it finds the CPU wheel on this disk; uv would not look there), without compiling its
# bytecode up front (16 s instead of 29; Python compiles what it imports); the rest through uv, which installs it
# in about 9 s where pip took 74 (the same versions), keeping the torch already there. Should uv fail, pip does it.
$(BIN)/layout-retouch: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip uv
	$(BIN)/pip install -q --no-compile $(TORCH)
	$(BIN)/uv pip install -q --python $(BIN)/python -e ".[dev,web]" || $(BIN)/pip install -q -e ".[dev,web]"
	touch $@

setup: $(BIN)/layout-retouch

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/layout-retouch demo --out $(OUT) --overwrite

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest
	$(BIN)/ruff check .

lint: setup
	$(BIN)/ruff check .
