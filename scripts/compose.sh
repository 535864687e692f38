#!/usr/bin/env bash
# The container demo's stack (scripts/compose_demo.sh): any compose command on it, and down.
#   scripts/compose.sh down          # containers, networks, volumes, its settings and secrets
#   scripts/compose.sh logs client-a # or ps, exec ..., any compose sub-command
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/compose_lib.sh
case ${1:-ps} in
    down)
        if [[ -f $COMPOSE_ENV ]]; then
            compose --profile gpu --profile monitoring down -v --remove-orphans --timeout 20
        fi
        rm -rf "$COMPOSE_WORK"
        echo "removed the $COMPOSE_PROJECT stack, its volumes and $COMPOSE_WORK" ;;
    *)
        [[ -f $COMPOSE_ENV ]] || { echo "no container demo here ($COMPOSE_ENV): make compose-demo" >&2; exit 1; }
        compose "$@" ;;
esac
