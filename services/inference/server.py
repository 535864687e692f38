"""Run the app under uvicorn: one process, one event loop (the batcher needs them shared).

Scale out with replicas rather than uvicorn workers: each replica finds the ONNX file of
the served version in MLflow and never exports again.
"""

from __future__ import annotations

import sys

from .settings import InferenceSettings


def serve(host: str | None = None, port: int | None = None, log_level: str = "info") -> None:
    import uvicorn

    from .app import create_app

    settings = InferenceSettings()
    from leukofed.logging import configure
    from leukofed.startup import StartupRefused

    configure("inference", level=log_level)  # JSON lines shared by every service
    try:
        app = create_app(settings)
    except StartupRefused as exc:
        sys.exit(str(exc))  # one line on stderr, exit status 1
    uvicorn.run(app, host=host or settings.host, port=port or settings.port,
                log_level=log_level, log_config=None, access_log=False,
                timeout_graceful_shutdown=10, proxy_headers=bool(settings.forwarded_allow_ips),
                forwarded_allow_ips=settings.forwarded_allow_ips or None,
                ssl_certfile=settings.https_cert_file, ssl_keyfile=settings.https_key_file)
