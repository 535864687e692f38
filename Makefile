# leukofed: every user-facing target runs `setup` first (idempotent, seconds when unchanged).
SHELL := /bin/bash
PY := .venv/bin/python
DATA ?= ../shared/data/all-pbs
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-unit lint lock bench-central

setup:
	@bash scripts/setup.sh

test: setup
	@bash scripts/test.sh

test-unit: setup
	.venv/bin/pytest -q tests/unit

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check leukofed services registry tests benchmarks || true

lock:
	bash scripts/lock.sh

bench-central: setup
	$(PY) benchmarks/bench_central.py --data $(DATA)
