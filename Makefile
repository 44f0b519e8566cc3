# The two front-door commands (see README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out/demo

.PHONY: setup demo test lint

$(BIN)/layout-retouch: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch that lies on this machine's disk; GPU users: see README.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/layout-retouch

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/layout-retouch demo --out $(OUT)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest
	$(BIN)/ruff check .

lint: setup
	$(BIN)/ruff check .
