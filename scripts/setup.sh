#!/usr/bin/env bash
# Idempotent install: system packages (when root and missing), .venv from the one lockfile.
# Fast path: when requirements.lock and pyproject.toml are unchanged since the last
# successful install, it only checks the system packages and exits.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.8
SYSTEM_PACKAGES=(redis-server)
[[ "${LEUKOFED_BROWSER:-auto}" != "no" ]] && SYSTEM_PACKAGES+=(chromium)

missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${missing[*]}" >&2
    echo "setup: install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

stamp=.venv/.leukofed-installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && "$(cat $stamp)" == "$want" ]]; then
  exit 0
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q "uv==${UV_VERSION}"
.venv/bin/uv pip sync -q --compile-bytecode --python .venv/bin/python requirements.lock
.venv/bin/uv pip install -q --python .venv/bin/python --no-deps -e .
echo "$want" > "$stamp"
echo "setup: .venv ready ($(.venv/bin/python --version))"
