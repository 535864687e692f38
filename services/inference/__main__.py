"""``python -m services.inference``: run the service under uvicorn (settings from env)."""

from __future__ import annotations

from .server import serve

if __name__ == "__main__":
    serve()
