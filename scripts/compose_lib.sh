# Shared by scripts/compose_demo.sh, scripts/compose.sh and the container tests (sourced).
# The demo's stack is its own compose project with its own settings file and secrets, so it
# never touches a real deployment's .env or secrets/ in this folder.
COMPOSE_WORK=${COMPOSE_WORK:-/var/tmp/leukofed-compose}
COMPOSE_PROJECT=${COMPOSE_PROJECT:-leukofed-demo}
COMPOSE_ENV=$COMPOSE_WORK/compose.env
VENV=${VENV:-.venv/bin}
# Published on 127.0.0.1, away from the local stack's and the tests' ports.
DEMO_AGGREGATOR_PORT=${DEMO_AGGREGATOR_PORT:-18001}
DEMO_INFERENCE_PORT=${DEMO_INFERENCE_PORT:-18000}
DEMO_MLFLOW_PORT=${DEMO_MLFLOW_PORT:-15000}
DEMO_REDIS_PORT=${DEMO_REDIS_PORT:-16379}
MLFLOW_PORT=$DEMO_MLFLOW_PORT
AGGREGATOR_URL=http://127.0.0.1:$DEMO_AGGREGATOR_PORT
INFERENCE_URL=http://127.0.0.1:$DEMO_INFERENCE_PORT

# Compose v2 (`docker compose`) where installed, else Debian's docker-compose 1.29: the
# file is valid for both.
compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose --env-file "$COMPOSE_ENV" -p "$COMPOSE_PROJECT" "$@"
    else
        docker-compose --env-file "$COMPOSE_ENV" -p "$COMPOSE_PROJECT" "$@"
    fi
}

env_value() { sed -n "s/^$1=//p" "$COMPOSE_ENV" | tail -1; }

# The settings file: .env.example, the demo's folders and ports, the images make images chose,
# then every secret drawn by infra/security/compose_secrets.py (keys, TLS, ACL in secrets/).
compose_prepare() {
    mkdir -p "$COMPOSE_WORK/data/empty"
    [[ -f $COMPOSE_ENV ]] || cp .env.example "$COMPOSE_ENV"
    local hospitals="$COMPOSE_WORK/data/hospitals"
    {
        echo "COMPOSE_PROJECT_NAME=$COMPOSE_PROJECT"
        echo "SECRETS_DIR=$COMPOSE_WORK/secrets"
        for h in a b c; do
            local dir="$hospitals/$h"; [[ -d $dir ]] || dir="$COMPOSE_WORK/data/empty"
            echo "HOSPITAL_${h^^}_DATA=$dir"
        done
        echo "SERVER_TEST_DATA=$COMPOSE_WORK/data/server/test"
        echo "AGGREGATOR_PORT=$DEMO_AGGREGATOR_PORT"
        echo "INFERENCE_PORT=$DEMO_INFERENCE_PORT"
        echo "MLFLOW_PORT=$DEMO_MLFLOW_PORT"
        echo "REDIS_PORT=$DEMO_REDIS_PORT"
        # What scripts/images.sh chose: the base, and Redis/PostgreSQL where none was pulled.
        if [[ -f infra/images.env ]]; then cat infra/images.env; fi
    } >"$COMPOSE_WORK/overrides.env"
    "$VENV/python" - "$COMPOSE_ENV" "$COMPOSE_WORK/overrides.env" <<'PY'
import sys
sys.path.insert(0, "infra/security")
from compose_secrets import read_env, write_env
from pathlib import Path
env, overrides = Path(sys.argv[1]), Path(sys.argv[2])
write_env(env, read_env(overrides))
PY
    "$VENV/python" infra/security/compose_secrets.py --hospitals a b c \
        --out "$COMPOSE_WORK/secrets" --env "$COMPOSE_ENV" >/dev/null
    INFERENCE_API_KEY=$(env_value INFERENCE_API_KEY)
    export LEUKOFED_AGGREGATOR_ADMIN_TOKEN
    LEUKOFED_AGGREGATOR_ADMIN_TOKEN=$(env_value AGGREGATOR_ADMIN_TOKEN)
}

# Retry COMMAND every second until it succeeds; after SECONDS, print SERVICE's last log lines
# and fail, saying what did not happen.
wait_for() {  # SECONDS SERVICE WHAT COMMAND...
    local seconds=$1 service=$2 what=$3; shift 3
    local deadline=$(( $(date +%s) + seconds ))
    until "$@" >/dev/null 2>&1; do
        if (( $(date +%s) > deadline )); then
            echo "$service did not $what within $seconds s; its log:" >&2
            compose logs --tail 40 "$service" >&2
            return 1
        fi
        sleep 1
    done
}

container_of() { compose ps -q "$1"; }
is_healthy() { [[ $(docker inspect -f '{{.State.Health.Status}}' "$(container_of "$1")") == healthy ]]; }

wait_http() { wait_for "$2" "$3" "answer $1" curl -fsS -o /dev/null "$1"; }  # URL SECONDS SERVICE
wait_healthy() { wait_for "$2" "$1" "become healthy" is_healthy "$1"; }     # SERVICE SECONDS

start_run() {  # ROUNDS LOCAL_EPOCHS IMAGE_SIZE MODEL HOSPITAL...
    local rounds=$1 epochs=$2 size=$3 model=$4; shift 4
    local hospitals; hospitals=$(printf '"%s",' "$@"); hospitals="[${hospitals%,}]"
    cat >"$COMPOSE_WORK/run.json" <<JSON
{"name": "compose-demo", "model": "$model", "image_size": $size, "rounds": $rounds,
 "local_epochs": $epochs, "batch_size": 16, "strategy": "fedavg", "hospitals": $hospitals,
 "min_fit_clients": 1, "round_deadline_s": ${ROUND_DEADLINE_S:-300}, "seed": 0,
 "server_test_dir": "/srv/leukofed/test"}
JSON
    LEUKOFED_AGGREGATOR_ADMIN_TOKEN=$(env_value AGGREGATOR_ADMIN_TOKEN) \
        "$VENV/leukofed" run start --config "$COMPOSE_WORK/run.json" --url "$AGGREGATOR_URL"
}

# `promote best` as the ML engineer: the MLflow admin, from this machine, through the
# published MLflow port; the move itself is made by the aggregator (its admin token), which
# signs the approval the inference service requires (issue 26, finding 6). Prints the
# version that became champion.
promote_best() {  # RUN_ID [extra promote options]
    local run_id=$1; shift
    MLFLOW_TRACKING_URI="http://127.0.0.1:$DEMO_MLFLOW_PORT" MLFLOW_TRACKING_USERNAME=admin \
        MLFLOW_TRACKING_PASSWORD="$(env_value MLFLOW_ADMIN_PASSWORD)" \
        LEUKOFED_AGGREGATOR_ADMIN_TOKEN=$(env_value AGGREGATOR_ADMIN_TOKEN) \
        "$VENV/leukofed" promote best --run-id "$run_id" --url "$AGGREGATOR_URL" "$@" \
        | tee "$COMPOSE_WORK/promote.txt" >&2
    sed -n 's/.* version \([0-9]*\) is now @champion.*/\1/p' "$COMPOSE_WORK/promote.txt"
}

# /readyz needs no API key and names the version served (and its alias, while it has it).
serving_version() {
    curl -fsS "$INFERENCE_URL/readyz" 2>/dev/null | "$VENV/python" -c \
        'import json, sys; print(json.load(sys.stdin)["model"]["version"])' 2>/dev/null || true
}

serves() { [[ "$(serving_version)" == "$1" ]]; }
wait_serving() { wait_for "$2" inference "serve version $1" serves "$1"; }  # VERSION SECONDS
