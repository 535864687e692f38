# leukofed: every user-facing target runs `setup` first (idempotent, seconds when unchanged).
SHELL := /bin/bash
PY := .venv/bin/python
DATA ?= ../shared/data/all-pbs
export PYTHONUNBUFFERED := 1

HOSPITALS ?= 3
ROUNDS ?=
LOCAL_EPOCHS ?=
MODEL ?=
IMAGE_SIZE ?=

.PHONY: setup test test-unit lint lock bench-scale bench-precision bench-train-speed bench-federated-many bench-federated-ablation bench-central bench-federated bench-strategies bench-privacy bench-privacy-example bench-inference bench-inference-rotation bench-inference-ab bench-secagg bench-refer up down \
	status logs demo test-browser test-security keys acl secrets test-inference-alone test-fast

setup:
	@bash scripts/setup.sh

test: setup
	@bash scripts/test.sh
	@$(MAKE) -s test-inference-alone

# The inference service without TensorFlow: its own environment from the "inference"
# dependency group (pinned by requirements.lock), where its unit tests must pass.
INFERENCE_VENV := .venv-inference
test-inference-alone: setup
	@[[ -x $(INFERENCE_VENV)/bin/python ]] || .venv/bin/uv venv -q --python .venv/bin/python $(INFERENCE_VENV)
	@.venv/bin/uv pip install -q --python $(INFERENCE_VENV)/bin/python --constraint requirements.lock \
	  --group pyproject.toml:inference --group pyproject.toml:inference-test
	@.venv/bin/uv pip install -q --python $(INFERENCE_VENV)/bin/python --no-deps -e .
	@$(INFERENCE_VENV)/bin/python -c "import importlib.util as u, sys; sys.exit('TensorFlow is installed in $(INFERENCE_VENV)' if u.find_spec('tensorflow') else 0)"
	@echo "inference without TensorFlow:"
	@$(INFERENCE_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_inference_*.py

test-unit: setup
	.venv/bin/pytest -q tests/unit

# The unit tests without the slow tier (real CNN training, real data): minutes, not ten.
test-fast: setup
	.venv/bin/pytest -q -m "not slow" tests/unit

lint: setup
	.venv/bin/ruff check .

lock:
	bash scripts/lock.sh

bench-central: setup
	$(PY) benchmarks/bench_central.py --data $(DATA)

# The "refer" rule on ten block splits, current bounds beside the previous ones (no model,
# about 3 minutes).
bench-refer: setup
	$(PY) benchmarks/bench_refer.py --data $(DATA)

# The default recipe and the old one, 3 hospitals with label skew, each hospital its own
# simulated laboratory, one unseen laboratory for testing (issue: read the cells).
FED_SCENARIOS ?= 3:dirichlet:fedavg:labs,3:dirichlet:fedavg:labs:old
bench-federated: setup
	$(PY) benchmarks/bench_federated.py --data $(DATA) --scenarios $(FED_SCENARIOS)

# Where the federation loses points: federated recipes beside centralized training on the
# same images for the same passes, in one process (docs/benchmarks-federated-ablation.md;
# about 7 minutes a row at 10 hospitals, 5 at 3).
ABLATION_SCENARIOS ?= 10,3
ABLATION_VARIANTS ?= constant:schedule=constant:la=0,default
bench-federated-ablation: setup
	$(PY) benchmarks/bench_fed_ablation.py --data $(DATA) --scenarios $(ABLATION_SCENARIOS) \
	  --variants "$(ABLATION_VARIANTS)"

# Strategies and BatchNorm handling (3 non-IID hospitals); :nocal = without calibration.
# These two were measured with the old recipe at 64 px (:old) against the 64 px centralized
# reference of benchmarks/results/federated-64px.json, and reproduce it.
STRATEGY_SCENARIOS ?= 3:dirichlet:fedprox:old,3:dirichlet:fedavg:fedbn:old,3:dirichlet:fedavgm:old,3:dirichlet:fedadam:old,3:dirichlet:fedyogi:old,3:dirichlet:fedavgm:nocal:old,3:dirichlet:fedadam:nocal:old
bench-strategies: setup
	$(PY) benchmarks/bench_federated.py --data $(DATA) --scenarios $(STRATEGY_SCENARIOS) \
	  --central-from benchmarks/results/federated-64px.json \
	  --out benchmarks/results/federated-strategies.json --doc docs/benchmarks-federated-strategies.md

# Accuracy against epsilon (client-level DP, GroupNorm compact CNN, 3 IID hospitals); reuses
# the centralized reference of bench-federated's results.
DP_SCENARIOS ?= 3:iid:fedavg:gn:old,3:iid:fedavg:gn:dp0:old,3:iid:fedavg:gn:dp0.003:old,3:iid:fedavg:gn:dp0.01:old,3:iid:fedavg:gn:dp0.03:old,3:iid:fedavg:gn:dp0.1:old
bench-privacy: setup
	$(PY) benchmarks/bench_federated.py --data $(DATA) --scenarios $(DP_SCENARIOS) \
	  --central-from benchmarks/results/federated-64px.json \
	  --out benchmarks/results/federated-privacy.json --doc docs/benchmarks-federated-privacy.md
	$(MAKE) bench-privacy-example

# Example-level DP (DP-SGD at each hospital, GroupNorm, batch 128, 12 x 2) at several target
# epsilons beside the same configuration without noise, then the default recipe without DP;
# privacy_table.py writes benchmarks/results/privacy.json and docs/benchmarks-privacy.md
# from them and the client-level runs. About 10 minutes a DP row on 2 cores.
EXAMPLE_DP_SCENARIOS ?= 3:iid:fedavg:labs:eps8,3:iid:fedavg:labs:gn,3:iid:fedavg:labs:eps20,3:iid:fedavg:labs:eps3,3:iid:fedavg:labs:eps1
bench-privacy-example: setup
	$(PY) benchmarks/bench_federated.py --data $(DATA) --scenarios $(EXAMPLE_DP_SCENARIOS) \
	  --batch-size 128 --rounds 12 --local-epochs 2 \
	  --central-from benchmarks/results/federated.json \
	  --out benchmarks/results/federated-example-dp.json --doc docs/benchmarks-federated-example-dp.md
	$(PY) benchmarks/bench_federated.py --data $(DATA) --scenarios 3:iid:fedavg:labs \
	  --batch-size 32 --rounds 12 --local-epochs 2 --append \
	  --central-from benchmarks/results/federated.json \
	  --out benchmarks/results/federated-example-dp.json --doc docs/benchmarks-federated-example-dp.md
	$(PY) benchmarks/audit_final_versions.py benchmarks/results/federated-example-dp.json
	$(PY) benchmarks/privacy_table.py

# The local stack runs signed: its keys, admin token and API key are made once in .run/keys
# (scripts/stack.sh, leukofed/local_keys.py). LEUKOFED_DEV_MODE=1 make up (or make demo)
# starts it without any, nothing signed or checked.
up: setup
	@bash scripts/stack.sh up

# Every local stack scripts/stack.sh started (the demo's, `leukofed simulate --keep`'s, ...).
down:
	@bash scripts/stack.sh down --all

status:
	@bash scripts/stack.sh status

logs:
	@bash scripts/stack.sh logs $(NAME)

demo: setup
	@DATA=$(DATA) HOSPITALS=$(HOSPITALS) ROUNDS=$(ROUNDS) LOCAL_EPOCHS=$(LOCAL_EPOCHS) MODEL=$(MODEL) IMAGE_SIZE=$(IMAGE_SIZE) bash scripts/demo.sh

# Deployment (issue 5): static checks of docker-compose.yml and the Dockerfiles, the generated
# configuration reference, and the images (needs a Docker engine; none runs on the dev boxes).
.PHONY: test-deploy config-docs images compose-demo compose-down test-containers bench-images
test-deploy: setup
	.venv/bin/pytest -q tests/deploy

config-docs: setup
	$(PY) scripts/gen_config_docs.py

# Every image from infra/Dockerfile (one target per service); a Debian base made with
# debootstrap where no registry is reachable. Sizes and times: benchmarks/results/images.json.
images:
	@bash scripts/images.sh $(TARGETS)

# Image sizes and build times: cold, cached and after a code change, in one run.
bench-images: setup
	$(PY) benchmarks/bench_images.py

# The federation in containers: images, 2 hospitals on their own networks, a run, promotion,
# a prediction from the inference container: a smoke test on synthetic images, REAL_DATA=1 for
# DATA's images.
compose-demo: setup
	@DATA=$(DATA) REAL_DATA=$(REAL_DATA) bash scripts/compose_demo.sh

compose-down:
	@bash scripts/compose.sh down

# The container tests: build, run, restart, isolate (skipped with a reason without Docker).
test-containers: setup
	.venv/bin/pytest -q -p no:cacheprovider tests/containers

bench-inference: setup
	$(PY) benchmarks/bench_inference.py

# The default model with and without its rotation ensemble, side by side in one run.
bench-inference-rotation: setup
	$(PY) benchmarks/bench_inference.py --configs compact_cnn:0:128:plain,compact_cnn:0:128 \
	  --json benchmarks/results/inference-rotation.json --markdown docs/benchmarks-inference-rotation.md

# The serving code of another commit (BASE, default: the last one before the service stopped
# importing TensorFlow) and this tree, alternated on the same model: ratios and the drift.
BASE ?= dc0d93d
bench-inference-ab: setup
	benchmarks/inference_ab.sh $(BASE)

# Secure aggregation against plain FedAvg, side by side: protocol cost at 3, 10 and 30
# hospitals, and accuracy on the real data from the same local updates.
bench-secagg: setup
	$(PY) benchmarks/bench_secagg.py --data $(DATA)
	$(PY) benchmarks/bench_federated.py --data $(DATA) --rounds 5 \
	  --scenarios 3:dirichlet:fedavg:old,3:dirichlet:fedavg:old:secure \
	  --central-from benchmarks/results/federated-64px.json \
	  --out benchmarks/results/secagg-stack.json --doc docs/benchmarks-secagg-stack.md

# 10 and 50 hospitals (Dirichlet 0.5, virtual hospitals) beside the 3- and 5-hospital rows
# of the 64 px runs, same recipe and centralized reference.
bench-federated-many: setup
	$(PY) benchmarks/bench_federated.py --data $(DATA) --rounds 15 --append \
	  --scenarios 10:dirichlet:fedavg:old,50:dirichlet:fedavg:old \
	  --central-from benchmarks/results/federated-64px.json \
	  --out benchmarks/results/federated-64px.json --doc docs/benchmarks-federated-64px.md

# Many hospitals on one machine: round time, orchestration overhead, aggregator and Redis
# memory, bytes through Redis at 10, 50 and 200 virtual hospitals (docs/benchmarks-scale.md).
bench-scale: setup
	$(PY) benchmarks/bench_scale.py

# Training speed under float32 and mixed bfloat16 (the ratio on this machine).
bench-precision: setup
	$(PY) benchmarks/bench_precision.py

# Training speed against an earlier commit (SPEED_BASE=rev), alternated, medians.
bench-train-speed: setup
	$(PY) benchmarks/bench_train_speed.py $(if $(SPEED_BASE),--base $(SPEED_BASE))

test-browser: setup
	.venv/bin/pytest -q tests/browser

test-security: setup
	.venv/bin/pytest -q tests/unit/test_signing.py tests/unit/test_privacy.py tests/unit/test_robust.py tests/integration/test_security_*.py

# Ed25519 key pairs for the aggregator and each hospital (ids a, b, c, ... by default).
keys: setup
	$(PY) -m leukofed.signing generate --out .run/keys aggregator $(shell $(PY) -c "import string; print(' '.join(string.ascii_lowercase[:$(HOSPITALS)]))")

# Everything docker-compose.yml needs to start closed: keys, TLS, Redis ACL (secrets/) and
# the secrets in .env (infra/security/compose_secrets.py).
secrets: setup
	$(PY) infra/security/compose_secrets.py --hospitals a b c

# Redis ACL users: one per hospital, one for the aggregator, the default user disabled.
acl: setup
	$(PY) infra/security/gen_acl.py --out infra/security/generated $(shell $(PY) -c "import string; print(' '.join(string.ascii_lowercase[:$(HOSPITALS)]))")
