# leukofed: every user-facing target runs `setup` first (idempotent, seconds when unchanged).
SHELL := /bin/bash
PY := .venv/bin/python
DATA ?= ../shared/data/all-pbs
export PYTHONUNBUFFERED := 1

HOSPITALS ?= 3
ROUNDS ?=
MODEL ?=
IMAGE_SIZE ?=

.PHONY: setup test test-unit lint lock bench-central bench-federated up down status logs demo

setup:
	@bash scripts/setup.sh

test: setup
	@bash scripts/test.sh

test-unit: setup
	.venv/bin/pytest -q tests/unit

lint: setup
	.venv/bin/ruff check .

lock:
	bash scripts/lock.sh

bench-central: setup
	$(PY) benchmarks/bench_central.py --data $(DATA)

bench-federated: setup
	$(PY) benchmarks/bench_federated.py --data $(DATA)

up: setup
	@bash scripts/stack.sh up

down:
	@bash scripts/stack.sh down

status:
	@bash scripts/stack.sh status

logs:
	@bash scripts/stack.sh logs $(NAME)

demo: setup
	@DATA=$(DATA) HOSPITALS=$(HOSPITALS) ROUNDS=$(ROUNDS) MODEL=$(MODEL) IMAGE_SIZE=$(IMAGE_SIZE) bash scripts/demo.sh

# Deployment (issue 5): static checks of docker-compose.yml and the Dockerfiles, the generated
# configuration reference, and the images (needs a Docker engine; none runs on the dev boxes).
.PHONY: test-deploy config-docs images
test-deploy: setup
	.venv/bin/pytest -q tests/deploy

config-docs: setup
	$(PY) scripts/gen_config_docs.py

images:
	docker compose build
