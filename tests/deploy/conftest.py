"""Static deployment checks: no Docker engine, only files, parsers and linters.

The compose file is checked twice: as written (the Compose JSON schema accepts the
``${VAR}`` strings) and after interpolation with the values of ``.env.example``, the way
``docker compose`` would see it on a machine where .env was copied from the example.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
sys.path.insert(0, str(ROOT / "infra" / "security"))  # compose_secrets, gen_acl, make_certs

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}"
                  r"|([A-Za-z_][A-Za-z0-9_]*))")


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}. A missing required variable raises, as compose refuses."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        value = env.get(name)
        empty = value is None or (value == "" and op and op.startswith(":"))
        if op in (":-", "-") and (value is None if op == "-" else empty):
            return arg
        if op in (":?", "?") and (value is None if op == "?" else empty):
            raise KeyError(f"{name}: {arg}")
        return value or ""

    return _VAR.sub(sub, text)


def _interpolate_values(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_values(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_values(v, env) for k, v in node.items()}
    return node


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as compose sees it: parsed (PyYAML resolves anchors and << merge
    keys), then, with ``env``, every string value interpolated (never comments or keys)."""
    data = yaml.safe_load(COMPOSE.read_text())
    return data if env is None else _interpolate_values(data, env)


@pytest.fixture(scope="session")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="session")
def compose(example_env: dict[str, str]) -> dict[str, Any]:
    return load_compose(example_env)


@pytest.fixture(scope="session")
def raw_compose() -> dict[str, Any]:
    return load_compose()
