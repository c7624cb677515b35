# The two commands of the README's quick start are `make serve` and `make test`;
# both set up what they need first (idempotent: a second setup returns at once).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install kit serve test bench lint-deploy

install:
	@bash scripts/install.sh

kit: install
	@$(PY) -m service.cli kit build

serve: install
	@$(PY) -m service.cli serve

test: install
	@$(PY) -m service.cli kit build
	@$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	@$(PY) loadtests/bench_gateway_vs_vllm.py
