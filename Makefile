# The two commands of the README's quick start are `make serve` and `make test`;
# both set up what they need first (idempotent: a second setup returns at once).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install kit serve test test-fast lint bench

install:
	@bash scripts/install.sh

kit: install
	@$(PY) -m service.cli kit build

serve: install
	@$(PY) -m service.cli serve

# Style (ruff) and the import rule of docs/ARCHITECTURE.md (import-linter).
lint: install
	@.venv/bin/ruff check .
	@.venv/bin/lint-imports --no-cache

test: install lint
	@$(PY) -m service.cli kit build
	@$(PY) -m pytest -q $(PYTEST_ARGS)

# The replica's logic on a fake engine and a real Redis: under a minute, no kit, no vLLM.
test-fast: install
	@$(PY) -m pytest -q tests/fast $(PYTEST_ARGS)

bench: install
	@$(PY) loadtests/bench_gateway_vs_vllm.py
