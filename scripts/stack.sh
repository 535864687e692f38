#!/usr/bin/env bash
# Local process mode of the whole stack: redis-server, MLflow (SQLite + local artifacts), the
# aggregator under uvicorn, one Celery worker per hospital, and the inference service (it
# serves the champion once one is promoted; until then /readyz says why it is not ready).
#
#   scripts/stack.sh up | down [--all] | status | logs [NAME]
#
# Environment (all optional):
#   REDIS_PORT=6379  MLFLOW_PORT=5000  AGGREGATOR_PORT=8001  INFERENCE_PORT=8000  RUN_DIR=.run
#   LEUKOFED_LOG_FORMAT=json|text  (every service logs JSON lines by default)
#   HOSPITAL_DATA=DIR   folder with one sub-folder per hospital (DIR/a, DIR/b, ...); workers
#                       are started for its sub-folders (or for HOSPITAL_IDS=a,b,c). Default:
#                       the last value given, else RUN_DIR/demo/hospitals when the demo ran
#   SERVER_TEST_MANIFEST=FILE  split manifest whose test split the aggregator evaluates
#   VIRTUAL_WORKERS=N   simulation: N processes of virtual hospitals (services/client/
#                       virtual.py) serve the hospitals instead of one worker each
#   STACKS_FILE=.run/stacks  where `up` lists the RUN_DIR of every stack it started
#   KEYS_DIR=RUN_DIR/keys    the stack's keys and secrets (below)
#   LEUKOFED_DEV_MODE=1      development mode: no keys, no tokens, nothing signed or checked
# Signed by default, as compose runs: `up` makes once (leukofed/local_keys.py; folder 0700,
# private files 0600) the aggregator's signing key, each hospital's key, the public keys
# each service reads, the aggregator's admin token and the inference API key, and starts
# every service with them, so tasks, answers and models are signed and the inference
# service serves only a champion whose signature it verified. The CLI and the web page
# need the secrets: LEUKOFED_AGGREGATOR_ADMIN_TOKEN_FILE=KEYS_DIR/admin-token,
# LEUKOFED_INFERENCE_API_KEY=$(cat KEYS_DIR/inference-api-key) (scripts/demo.sh sets both).
# Each process runs in its own session; its pid file is RUN_DIR/pids/NAME.pid and its log
# RUN_DIR/logs/NAME.log. `up` skips what already runs; `down` stops every process it started
# in RUN_DIR; `down --all` (what `make down` runs) stops every stack `up` started, whatever
# its RUN_DIR (`leukofed simulate --keep` leaves one in .run/simulate/run).
set -euo pipefail
cd "$(dirname "$0")/.."

REDIS_PORT=${REDIS_PORT:-6379}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
AGGREGATOR_PORT=${AGGREGATOR_PORT:-8001}
INFERENCE_PORT=${INFERENCE_PORT:-8000}
RUN_DIR=${RUN_DIR:-.run}
VENV=${VENV:-.venv/bin}
PIDS=$RUN_DIR/pids
LOGS=$RUN_DIR/logs
mkdir -p "$PIDS" "$LOGS"
RUN_DIR_ABS=$(cd "$RUN_DIR" && pwd)
BROKER_URL="redis://127.0.0.1:${REDIS_PORT}/0"
KEYS_DIR=${KEYS_DIR:-$RUN_DIR_ABS/keys}
MLFLOW_URL="http://127.0.0.1:${MLFLOW_PORT}"
STACKS_FILE=${STACKS_FILE:-.run/stacks}

dev_mode() {  # LEUKOFED_DEV_MODE on, read as leukofed.startup.dev_mode reads it
    local value=${LEUKOFED_DEV_MODE:-}
    [[ ${value,,} =~ ^[[:space:]]*(1|true|yes|on)[[:space:]]*$ ]]
}

remember_stack() {  # list RUN_DIR among the stacks `down --all` stops
    mkdir -p "$(dirname "$STACKS_FILE")"
    grep -qxF "$RUN_DIR_ABS" "$STACKS_FILE" 2>/dev/null || echo "$RUN_DIR_ABS" >>"$STACKS_FILE"
}

forget_stack() {  # forget_stack DIR: its stack is down
    [[ -f $STACKS_FILE ]] || return 0
    grep -vxF "$1" "$STACKS_FILE" >"$STACKS_FILE.tmp" || true
    mv "$STACKS_FILE.tmp" "$STACKS_FILE"
}

known_stacks() {  # this RUN_DIR, stacks inside it, every one `up` listed; once each
    {
        echo "$RUN_DIR_ABS"
        # e.g. .run/simulate/run, also when started before the list existed
        find "$RUN_DIR_ABS" -mindepth 2 -maxdepth 4 -type d -name pids -printf '%h\n' \
            2>/dev/null | sort
        [[ ! -f $STACKS_FILE ]] || cat "$STACKS_FILE"
    } | awk 'NF && !seen[$0]++'
}

alive() {  # alive NAME: the recorded process still runs
    local f="$PIDS/$1.pid"
    [[ -f $f ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

start() {  # start NAME COMMAND...: in its own session, so `down` can stop its whole group
    local name=$1; shift
    if alive "$name"; then
        echo "  $name already running (pid $(cat "$PIDS/$name.pid"))"
        return
    fi
    setsid "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
    echo $! >"$PIDS/$name.pid"
    echo "  $name started (pid $!, log $LOGS/$name.log)"
}

wait_port() {  # wait_port PORT NAME SECONDS
    local port=$1 name=$2 limit=${3:-60} i
    for ((i = 0; i < limit * 5; i++)); do
        if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        if ! alive "$name"; then
            echo "  $name exited; last log lines:" >&2
            tail -20 "$LOGS/$name.log" >&2
            return 1
        fi
        sleep 0.2
    done
    echo "  $name: nothing on port $port after ${limit}s (log $LOGS/$name.log)" >&2
    return 1
}

# Remember where the hospitals' data lives, so a later `up` or `status` needs no settings.
if [[ -n ${HOSPITAL_DATA:-} ]]; then
    echo "HOSPITAL_DATA=$HOSPITAL_DATA" >"$RUN_DIR/stack.env"
elif [[ -f $RUN_DIR/stack.env ]]; then
    HOSPITAL_DATA=$(sed -n 's/^HOSPITAL_DATA=//p' "$RUN_DIR/stack.env")
elif [[ -d $RUN_DIR/demo/hospitals ]]; then  # the demo's partition, once it has run
    HOSPITAL_DATA=$RUN_DIR/demo/hospitals
fi

hospital_ids() {
    if [[ -n ${HOSPITAL_IDS:-} ]]; then
        tr ',' ' ' <<<"$HOSPITAL_IDS"
    elif [[ -n ${HOSPITAL_DATA:-} && -d $HOSPITAL_DATA ]]; then
        find "$HOSPITAL_DATA" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort | tr '\n' ' '
    fi
}

start_virtual() {  # VIRTUAL_WORKERS processes share the hospitals round-robin
    local n=$VIRTUAL_WORKERS i h
    local -a share=() virtual_keys=()
    dev_mode || virtual_keys=(LEUKOFED_VIRTUAL_KEYS_DIR="$KEYS_DIR")
    for ((i = 0; i < n; i++)); do share[i]=""; done
    i=0
    for h in $(hospital_ids); do
        share[i % n]+="${share[i % n]:+,}$h"
        i=$((i + 1))
    done
    for ((i = 0; i < n; i++)); do
        [[ -n ${share[i]} ]] || continue
        start "virtual-$i" env LEUKOFED_VIRTUAL_HOSPITALS_DIR="${HOSPITAL_DATA:-data}" \
            LEUKOFED_VIRTUAL_HOSPITALS="${share[i]}" \
            LEUKOFED_VIRTUAL_BROKER_URL="$BROKER_URL" \
            LEUKOFED_VIRTUAL_STATE_DIR="$RUN_DIR_ABS/virtual" "${virtual_keys[@]}" \
            "$VENV/leukofed" client virtual
    done
}

stack_mode() {  # what `up` starts now: signed, or development (no keys)
    if dev_mode; then echo development; else echo signed; fi
}

check_mode() {  # record the mode when nothing runs; say so when what runs has another
    local f was
    for f in "$PIDS"/*.pid; do
        [[ -f $f ]] && alive "$(basename "$f" .pid)" || continue
        # A stack started before the mode was recorded ran in development mode.
        was=$(cat "$RUN_DIR/stack.mode" 2>/dev/null || echo development)
        if [[ $was != "$(stack_mode)" ]]; then
            echo "  the stack in $RUN_DIR already runs in $was mode and stays so: stop it" \
                 "(scripts/stack.sh down) and start it again for $(stack_mode) mode" >&2
        fi
        return 0
    done
    stack_mode >"$RUN_DIR/stack.mode"
}

up() {
    echo "starting the stack (state in $RUN_DIR, $(stack_mode) mode)"
    remember_stack
    local -a agg_keys=() inference_keys=()
    if dev_mode; then
        echo "  development mode (LEUKOFED_DEV_MODE=$LEUKOFED_DEV_MODE): nothing signed or" \
             "checked, no admin token, no API key; the inference service serves unchecked models"
    else
        # shellcheck disable=SC2046  # one argument per hospital id
        "$VENV/python" -m leukofed.local_keys "$KEYS_DIR" $(hospital_ids)
        agg_keys=(LEUKOFED_AGGREGATOR_SIGNING_KEY_FILE="$KEYS_DIR/aggregator.key"
                  LEUKOFED_AGGREGATOR_HOSPITAL_KEYS_DIR="$KEYS_DIR/hospitals"
                  LEUKOFED_AGGREGATOR_ADMIN_TOKEN_FILE="$KEYS_DIR/admin-token")
        inference_keys=(LEUKOFED_INFERENCE_MODEL_PUBLIC_KEY_FILE="$KEYS_DIR/aggregator.pub")
    fi
    check_mode
    mkdir -p "$RUN_DIR/redis" "$RUN_DIR/mlflow/artifacts"
    start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$RUN_DIR_ABS/redis" \
        --appendonly yes --save "" --protected-mode no
    wait_port "$REDIS_PORT" redis 20
    start mlflow "$VENV/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
        --backend-store-uri "sqlite:///$RUN_DIR_ABS/mlflow/mlflow.db" \
        --artifacts-destination "$RUN_DIR_ABS/mlflow/artifacts"
    local agg_env=(LEUKOFED_AGGREGATOR_BROKER_URL="$BROKER_URL"
                   LEUKOFED_AGGREGATOR_MLFLOW_TRACKING_URI="$MLFLOW_URL"
                   LEUKOFED_AGGREGATOR_STATE_DIR="$RUN_DIR_ABS/aggregator" "${agg_keys[@]}")
    if [[ -n ${SERVER_TEST_MANIFEST:-} ]]; then
        agg_env+=(LEUKOFED_AGGREGATOR_SERVER_TEST_MANIFEST="$SERVER_TEST_MANIFEST")
    fi
    start aggregator env "${agg_env[@]}" "$VENV/uvicorn" services.aggregator.app:create_app \
        --factory --host 127.0.0.1 --port "$AGGREGATOR_PORT"
    local h
    if ((${VIRTUAL_WORKERS:-0} > 0)); then
        start_virtual
    else
        for h in $(hospital_ids); do
            local -a client_keys=()
            dev_mode || client_keys=(
                LEUKOFED_CLIENT_SIGNING_KEY_FILE="$KEYS_DIR/$h.key"
                LEUKOFED_CLIENT_AGGREGATOR_PUBLIC_KEY_FILE="$KEYS_DIR/aggregator.pub"
                LEUKOFED_CLIENT_PEER_PUBLIC_KEYS_DIR="$KEYS_DIR/hospitals")
            start "client-$h" env LEUKOFED_CLIENT_HOSPITAL_ID="$h" "${client_keys[@]}" \
                LEUKOFED_CLIENT_DATA_DIR="${HOSPITAL_DATA:-data}/$h" \
                LEUKOFED_CLIENT_BROKER_URL="$BROKER_URL" \
                LEUKOFED_CLIENT_STATE_DIR="$RUN_DIR_ABS/client-$h" \
                "$VENV/celery" -A services.client.worker worker --pool solo --concurrency 1 \
                -Q "hospital.$h" -n "$h@%h" --loglevel INFO --without-gossip --without-mingle
        done
    fi
    mkdir -p "$RUN_DIR_ABS/inference/onnx"
    # The API key goes through the environment, not a command line another user could read.
    local api_key=${LEUKOFED_INFERENCE_API_KEY:-}
    dev_mode || api_key=$(<"$KEYS_DIR/inference-api-key")
    LEUKOFED_INFERENCE_API_KEY=$api_key start inference \
        env LEUKOFED_INFERENCE_TRACKING_URI="$MLFLOW_URL" \
        LEUKOFED_INFERENCE_ONNX_CACHE_DIR="$RUN_DIR_ABS/inference/onnx" "${inference_keys[@]}" \
        "$VENV/leukofed" serve --host 127.0.0.1 --port "$INFERENCE_PORT"
    wait_port "$MLFLOW_PORT" mlflow 180
    wait_port "$AGGREGATOR_PORT" aggregator 180
    wait_port "$INFERENCE_PORT" inference 180
    echo "up: redis $BROKER_URL | MLflow UI $MLFLOW_URL | aggregator" \
         "http://127.0.0.1:$AGGREGATOR_PORT/docs | inference page" \
         "http://127.0.0.1:$INFERENCE_PORT/ | hospitals: $(hospital_ids)"
    if ! dev_mode; then
        echo "signed: the CLI needs LEUKOFED_AGGREGATOR_ADMIN_TOKEN_FILE=$KEYS_DIR/admin-token;" \
             "the web page and leukofed predict the API key in $KEYS_DIR/inference-api-key"
    fi
}

running() {  # running PID: alive, and not a zombie (exited, not yet reaped by its parent)
    local stat state
    kill -0 "$1" 2>/dev/null || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    read -r state _ <<<"${stat##*) }"
    [[ $state != Z ]]
}

session_of() {  # session_of PID: its session id (fields after the command name in stat)
    local stat sid
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -r _ _ _ sid _ <<<"${stat##*) }"
    echo "$sid"
}

stop_one() {  # stop_one NAME: TERM the session, then KILL what is left
    local name=$1 f="$PIDS/$1.pid" pid i sid
    [[ -f $f ]] || return 0
    pid=$(cat "$f")
    # `start` made the process a session leader: a pid that leads no session of its own was
    # reused by someone else's process since (a reboot, say), and is not ours to signal.
    if sid=$(session_of "$pid") && [[ $sid != "$pid" ]]; then
        echo "  $name: pid $pid is no longer the process this stack started; not signalled"
        rm -f "$f"
        return 0
    fi
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            running "$pid" || break
            sleep 0.2
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
        echo "  $name stopped"
    fi
    rm -f "$f"
}

down_dir() {  # down_dir DIR: stop every process the stack in DIR started
    local PIDS=$1/pids f name
    # Workers and the aggregator first, so nothing reconnects to a broker going away.
    for f in "$PIDS"/inference.pid "$PIDS"/client-*.pid "$PIDS"/virtual-*.pid \
             "$PIDS"/aggregator.pid \
             "$PIDS"/mlflow.pid "$PIDS"/redis.pid "$PIDS"/*.pid; do
        [[ -f $f ]] || continue
        name=$(basename "$f" .pid)
        stop_one "$name"
    done
    forget_stack "$1"
}

down() {  # down [--all]
    local dir
    if [[ ${1:-} == --all ]]; then
        while IFS= read -r dir; do
            if compgen -G "$dir/pids/*.pid" >/dev/null; then
                echo "stopping the stack in $dir"
                down_dir "$dir"
            else
                forget_stack "$dir"
            fi
        done < <(known_stacks)
    elif [[ -n ${1:-} ]]; then
        echo "usage: $0 down [--all]" >&2
        return 2
    else
        down_dir "$RUN_DIR_ABS"
    fi
    echo "down"
}

other_stacks() {  # a line for each other stack `up` started that still has processes
    local dir f
    while IFS= read -r dir; do
        [[ $dir != "$RUN_DIR_ABS" ]] || continue
        for f in "$dir"/pids/*.pid; do
            if [[ -f $f ]] && kill -0 "$(cat "$f")" 2>/dev/null; then
                echo "  another stack runs in $dir (RUN_DIR=$dir $0 status; make down stops it)"
                break
            fi
        done
    done < <(known_stacks)
}

admin_header() {  # the aggregator's bearer token as a header line (none in development mode)
    [[ ! -s $KEYS_DIR/admin-token ]] || printf 'Authorization: Bearer %s\n' \
        "$(<"$KEYS_DIR/admin-token")"
}

status() {
    local f name state=0
    other_stacks
    for f in "$PIDS"/*.pid; do
        [[ -f $f ]] || { echo "nothing started"; return 0; }
        name=$(basename "$f" .pid)
        if alive "$name"; then
            echo "  $name: running (pid $(cat "$f"))"
        else
            echo "  $name: DEAD (see $LOGS/$name.log)"
            state=1
        fi
    done
    if (echo >"/dev/tcp/127.0.0.1/$AGGREGATOR_PORT") 2>/dev/null; then
        # The token from its file through a descriptor, never on a command line.
        curl -fsS -H @<(admin_header) "http://127.0.0.1:$AGGREGATOR_PORT/v1/hospitals" \
            2>/dev/null \
            | "$VENV/python" -c '
import json, sys
for h in json.load(sys.stdin):
    print("  hospital %s: %s, %s images" % (h["hospital"], "live" if h["live"] else "not live",
                                            h["num_images"]))' \
            || true
    fi
    if (echo >"/dev/tcp/127.0.0.1/$INFERENCE_PORT") 2>/dev/null; then
        echo "  inference: $(curl -sS "http://127.0.0.1:$INFERENCE_PORT/readyz" 2>/dev/null \
            || echo 'no answer')"
    fi
    return $state
}

logs() {
    if [[ -n ${1:-} ]]; then
        tail -n 100 -f "$LOGS/$1.log"
    else
        tail -n 20 "$LOGS"/*.log
    fi
}

case ${1:-} in
    up) up ;;
    down) shift; down "${1:-}" ;;
    status) status ;;
    logs) shift; logs "${1:-}" ;;
    *) echo "usage: $0 up|down [--all]|status|logs [NAME]" >&2; exit 2 ;;
esac
