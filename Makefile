# `make run`: set up and start the gateway on the quickstart config.
# `make test`: set up, then lint, type-check and run the whole suite against real servers.

PYTHON ?= $(shell command -v python3.12 2>/dev/null || ls -1 /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck unit setup system bench clean

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found (set PYTHON=/path/to/python3.12)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

system:
	scripts/ensure-system.sh

run: setup
	$(BIN)/lictor run -c examples/quickstart/lictor.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

# Test modules run in parallel, one worker per core (at most 4: they share the local PostgreSQL and Redis), each
# module whole on one worker, as its module-scoped servers and gateway expect. PYTEST_WORKERS=0 runs serially.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

unit: setup system
	$(BIN)/pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

test: setup system lint typecheck unit

# Every benchmark, each against its baseline measured in the same run (several minutes).
bench: setup
	scripts/ensure-system.sh bench
	$(BIN)/python bench/bench_policy.py
	$(BIN)/python bench/bench_masking.py
	$(BIN)/python bench/bench_postgres.py
	$(BIN)/python bench/bench_http.py
	$(BIN)/python bench/bench_ssh.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
