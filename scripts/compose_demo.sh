#!/usr/bin/env bash
# The federation in containers (make compose-demo): the images built, each hospital's images
# in its own folder mounted read-only by its own client container on its own network, a
# federated run through the aggregator's API, the best version promoted by the ML engineer
# (MLflow admin), and a prediction from the inference container, which follows @champion.
# The same contracts as `make demo`; everything it starts is removed by `make compose-down`.
#
# By default it is a smoke test of the stack on synthetic images, and says so first: a model
# worth serving takes minutes of training that `make demo` does as local processes. REAL_DATA=1
# trains on DATA instead (then ROUNDS and LOCAL_EPOCHS must be enough for the release gate).
#
# Environment (all optional): REAL_DATA=1 with DATA=../shared/data/all-pbs
#   HOSPITALS=2 (2 or 3) ROUNDS=2 LOCAL_EPOCHS=1 IMAGE_SIZE (32 synthetic, 128 real)
#   MODEL=compact_cnn COMPOSE_WORK=/var/tmp/leukofed-compose COMPOSE_PROJECT=leukofed-demo
#   SKIP_IMAGES=1 (use the images already built) and the published ports below.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/compose_lib.sh

DATA=${DATA:-../shared/data/all-pbs}
HOSPITALS=${HOSPITALS:-2}
ROUNDS=${ROUNDS:-2}
LOCAL_EPOCHS=${LOCAL_EPOCHS:-1}
MODEL=${MODEL:-compact_cnn}
promote_opts=()  # `promote best` holds the champion to the release gate (leukofed.gate)
started=$(date +%s)
if [[ -n ${REAL_DATA:-} && -z ${SYNTHETIC:-} ]]; then
    [[ -d $DATA ]] || { echo "REAL_DATA=1 but no dataset at DATA=$DATA" >&2; exit 2; }
    echo "compose-demo on the real images of $DATA ($ROUNDS rounds x $LOCAL_EPOCHS local epochs): promotion only if the release gate passes"
else
    SYNTHETIC=1
    echo "compose-demo: a smoke test of the container stack on synthetic images, not of a model (REAL_DATA=1 trains on $DATA; make demo trains the real model)"
fi

if [[ -z ${SKIP_IMAGES:-} ]]; then
    echo "== 1/5 images (scripts/images.sh)"
    scripts/images.sh client aggregator inference mlflow
fi

if [[ -f $COMPOSE_ENV ]]; then  # its containers would keep the old folders mounted
    echo "== removing the previous container demo first"
    scripts/compose.sh down
fi

echo "== 2/5 each hospital's image folder, and the aggregator's test split, in $COMPOSE_WORK"
if [[ -z ${SYNTHETIC:-} ]]; then
    IMAGE_SIZE=${IMAGE_SIZE:-128}
    "$VENV/python" scripts/compose_data.py "$COMPOSE_WORK/data" --data "$DATA" --hospitals "$HOSPITALS"
else
    IMAGE_SIZE=${IMAGE_SIZE:-32}
    # Synthetic classes differ by colour alone: the release gate (its shortcut audit first)
    # refuses any model of them, as it should, so promotion is forced with a reason that is
    # recorded with the move. Never do this with real smears.
    promote_opts=(--force --reason "compose-demo on synthetic images: a smoke test of the stack, not of a model")
    echo "synthetic images (a smoke test of the stack, not of a model)"
    "$VENV/python" scripts/compose_data.py "$COMPOSE_WORK/data" --synthetic --hospitals "$HOSPITALS"
fi

echo "== 3/5 secrets and settings ($COMPOSE_ENV), then the stack ($COMPOSE_PROJECT)"
compose_prepare
ids=$(find "$COMPOSE_WORK/data/hospitals" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort)
clients=$(sed 's/^/client-/' <<<"$ids" | paste -sd' ' -)
# shellcheck disable=SC2086 # one word per service
compose up -d redis postgres mlflow mlflow-users aggregator inference $clients
wait_http "$AGGREGATOR_URL/healthz" 180 aggregator
for h in $ids; do wait_healthy "client-$h" 240; done

echo "== 4/5 federated run: $MODEL @${IMAGE_SIZE}px, $ROUNDS rounds x $LOCAL_EPOCHS local epochs, hospitals $(paste -sd, - <<<"$ids")"
run_id=$(start_run "$ROUNDS" "$LOCAL_EPOCHS" "$IMAGE_SIZE" "$MODEL" $ids)
echo "run $run_id; MLflow: http://127.0.0.1:$MLFLOW_PORT (user admin, password in $COMPOSE_ENV)"
"$VENV/leukofed" run watch "$run_id" --url "$AGGREGATOR_URL"
"$VENV/leukofed" run status "$run_id" --url "$AGGREGATOR_URL" >"$COMPOSE_WORK/run-status.json"

echo "== 5/5 promote (as the MLflow admin), then a prediction from the inference container"
champion=$(promote_best "$run_id" "${promote_opts[@]}")
[[ -n $champion ]] || { echo "nothing was promoted" >&2; exit 1; }
wait_serving "$champion" 120
image=$(find "$COMPOSE_WORK/data/server/test" -type f | sort | head -1)
echo "image: $image"
"$VENV/leukofed" predict "$image" --url "$INFERENCE_URL" --api-key "$INFERENCE_API_KEY"
echo "compose demo done in $(( $(date +%s) - started )) s. Aggregator API: $AGGREGATOR_URL/docs ;" \
     "web page: $INFERENCE_URL/ ; logs: scripts/compose.sh logs SERVICE ; remove it all: make compose-down"
