# The two commands of the README's quick start are `make serve` and `make test`;
# both set up what they need first (idempotent: a second setup returns at once).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install kit serve test test-fast lint bench bench-adapters bench-port loadtest

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
	@$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

# The replica's logic on a fake engine and a real Redis: under a minute, no kit, no vLLM.
test-fast: install
	@$(PY) -m pytest -q tests/fast $(PYTEST_ARGS)

bench: install
	@$(PY) loadtests/bench_gateway_vs_vllm.py

# Throughput and latency with 1/8/32/64 distinct patches in the mix vs base-only, and cold adapters (≈6 min).
bench-adapters: install kit
	@$(PY) loadtests/bench_adapters.py --engine vllm --max-loras 8,32

# Base upgrade with repair: old, carried, repaired and from-scratch patches per kit task (≈5 min).
bench-port: install kit
	@$(PY) loadtests/bench_port.py

# Locust, headless: the most users whose p99 TTFT stays under 1 s, then 5 minutes at that load (≈12 min).
loadtest: install kit
	@$(PY) loadtests/run_locust.py --find-max --time 300s
