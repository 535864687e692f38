"""Write docs/configuration.md from the settings classes themselves, so the reference cannot
drift from the code: every field, its environment variable(s), default and meaning.

    .venv/bin/python scripts/gen_config_docs.py          # rewrite the file
    .venv/bin/python scripts/gen_config_docs.py --check  # exit 1 if it is out of date

A field's meaning is its ``Field(description=...)``; fields without one take it from MEANINGS
below (prefer adding a description in the settings class).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import AliasChoices
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "configuration.md"

MEANINGS: dict[str, str] = {
    "broker_url": "Celery broker (Redis) URL, with this party's user and password",
    "visibility_timeout_s": "Redis redelivers an unacknowledged task after this many seconds; "
                            "must exceed the longest local training",
    "val_fraction": "share of the hospital's images held out for local validation",
    "test_fraction": "share of the hospital's images held out for local testing (evaluate)",
    "split_seed": "seed of the hospital's local block split",
    "block_size": "files per block of consecutive file numbers in the local split (near-"
                  "duplicate images stay on one side)",
    "mlflow_experiment": "MLflow experiment the federated runs are logged to",
    "model_name": "registered model name in the MLflow registry",
    "cache_dir": "local cache (decoded images, server-side test arrays)",
    "poll_interval_s": "seconds between polls (aggregator: task results; inference: the "
                       "alias in the registry)",
    "ping_timeout_s": "seconds to wait for workers' answers when checking who is live",
    "resume_on_start": "resume unfinished runs from their last completed round at startup",
    "host": "address to listen on (0.0.0.0 in a container)",
    "port": "TCP port to listen on",
    "tracking_uri": "MLflow tracking server URI",
    "model_alias": "registry alias the service follows (hot-swaps when it moves)",
    "model_version": "serve this fixed version instead of the alias",
    "max_upload_bytes": "largest accepted upload, in bytes (413 above)",
    "max_pixels": "largest accepted image, in pixels (decompression-bomb guard)",
    "max_files": "most images in one request",
    "max_batch_size": "most images per onnxruntime run (1 turns dynamic batching off)",
    "max_queue_delay_ms": "how long a request may wait for others to batch with (0: greedy)",
    "api_key": "when set, model routes require this X-API-Key header",
    "provider": "onnxruntime execution provider: auto (CUDA if present), cpu or cuda",
    "threads": "onnxruntime intra-op threads (0: every core)",
    "onnx_cache_dir": "where exported ONNX models are cached, per model version",
    "model_public_key_file": "the aggregator's public key (aggregator.pub): only versions "
                             "whose ONNX file it signed are served",
}

# Variables read outside the settings classes.
EXTRA: list[tuple[str, str, str]] = [
    ("LEUKOFED_LOG_FORMAT", "json", "every service: `json` (one JSON object per line, with "
     "service, run_id, round, hospital) or `text`"),
    ("LEUKOFED_LOG_LEVEL", "INFO", "every service: root log level"),
    ("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000", "fallback tracking URI of the aggregator "
     "and the inference service, and of the `leukofed` CLI"),
    ("LEUKOFED_AGGREGATOR_URL", "http://127.0.0.1:8001", "`leukofed run ...` commands: the "
     "aggregator to talk to"),
    ("LEUKOFED_INFERENCE_URL", "http://127.0.0.1:8000", "`leukofed predict`: the service"),
]

STACK: list[tuple[str, str, str]] = [
    ("REDIS_PORT", "6379", "redis-server port"),
    ("MLFLOW_PORT", "5000", "MLflow server port"),
    ("AGGREGATOR_PORT", "8001", "aggregator port"),
    ("INFERENCE_PORT", "8000", "inference service port"),
    ("RUN_DIR", ".run", "state, pid files and logs (RUN_DIR/logs/NAME.log)"),
    ("STACKS_FILE", ".run/stacks", "where `up` lists the RUN_DIR of every stack it started; "
     "`down --all` (`make down`) stops them all"),
    ("HOSPITAL_DATA", "(last value, else the demo's partition)", "folder with one sub-folder "
     "per hospital; one worker is started per sub-folder"),
    ("HOSPITAL_IDS", "(sub-folders of HOSPITAL_DATA)", "comma list of hospitals to start"),
    ("SERVER_TEST_MANIFEST", "(none)", "split manifest whose test split the aggregator "
     "evaluates"),
    ("KEYS_DIR", "RUN_DIR/keys", "the signed stack's keys and secrets, made once by `up` "
     "(folder 0700, private files 0600): `aggregator.key`/`.pub`, `<id>.key`/`.pub`, "
     "`hospitals/`, `admin-token`, `inference-api-key`"),
    ("LEUKOFED_DEV_MODE", "(off: signed)", "1: development mode, no keys, no tokens, "
     "nothing signed or checked (the inference service reports `signature: unchecked`)"),
]


def _classes() -> list[tuple[str, str, type[BaseSettings]]]:
    from leukofed.gate import GateFloors
    from services.aggregator.settings import AggregatorSettings
    from services.client.settings import ClientSettings
    from services.client.virtual import VirtualSettings
    from services.inference.settings import InferenceSettings

    return [
        ("Hospital client worker", "services/client/settings.py", ClientSettings),
        ("Virtual hospitals (simulation)", "services/client/virtual.py", VirtualSettings),
        ("Aggregator", "services/aggregator/settings.py", AggregatorSettings),
        ("Inference service", "services/inference/settings.py", InferenceSettings),
        ("Release gate (`leukofed promote`; each also a command-line option)",
         "leukofed/gate.py", GateFloors),
    ]


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    value = field.default
    if value is None:
        return "(none)"
    text = str(value)
    home = str(Path.home())
    if text.startswith(home):  # machine-specific: show it as the user sees it
        text = "~" + text[len(home):]
    if isinstance(value, bool):
        text = str(value).lower()
    return f"`{text}`" if text else '`""`'


def _env_names(prefix: str, name: str, field: Any) -> list[str]:
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [a for a in alias.choices if isinstance(a, str) and a.isupper()]
    return [f"{prefix}{name.upper()}"]


def missing_meanings() -> list[str]:
    return [f"{cls.__name__}.{name}" for _, _, cls in _classes()
            for name, f in cls.model_fields.items()
            if not f.description and name not in MEANINGS]


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- generated by scripts/gen_config_docs.py from the settings classes: do not edit;",
        "     run `.venv/bin/python scripts/gen_config_docs.py` after changing a setting -->",
        "",
        "Every service reads its settings from environment variables (and from a `.env` file "
        "in its working directory, for the aggregator and the client). Names are the field "
        "name in upper case after the service's prefix. In `docker-compose.yml` they are set "
        "per service; secrets come from `.env` (see `.env.example`).",
        "",
    ]
    for title, source, cls in _classes():
        prefix = cls.model_config.get("env_prefix", "")
        lines += [f"## {title}", "", f"`{source}`, prefix `{prefix}`.", "",
                  "| variable | default | meaning |", "|---|---|---|"]
        for name, field in cls.model_fields.items():
            names = " or ".join(f"`{n}`" for n in _env_names(prefix, name, field))
            meaning = (field.description or MEANINGS.get(name, "")).replace("|", "\\|")
            meaning = meaning.replace("<", "&lt;").replace(">", "&gt;")  # not HTML tags
            lines.append(f"| {names} | {_default(field)} | {meaning} |")
        lines.append("")
    lines += ["## Read outside the settings classes", "",
              "| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| `{n}` | `{d}` | {m} |" for n, d, m in EXTRA]
    lines += ["", "## Local process mode (`scripts/stack.sh`, `make up`)", "",
              "| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| `{n}` | {d if d.startswith('(') else f'`{d}`'} | {m} |" for n, d, m in STACK]
    lines += ["", "The compose stack's own variables (ports, passwords, data folders) are "
              "listed with their meaning in `.env.example`.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args()
    missing = missing_meanings()
    if missing:
        print(f"no meaning for: {', '.join(missing)} (add Field(description=...))",
              file=sys.stderr)
        return 1
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run "
                  "scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
