"""Test-only wrapper for hospital workers in test_secure_aggregation.py, loaded through
PYTHONPATH (Python imports ``sitecustomize`` at start-up). Production code has no hook:

* ``LEUKOFED_TEST_SPY_DIR``: before masking, each hospital writes what it is about to hide
  (the global weights it got, its plain delta and weight) to ``<dir>/<hospital>-<round>.npz``,
  so the test can compute the plain weighted mean the secure sum must equal;
* ``LEUKOFED_TEST_EXIT``: ``before:<round>`` ends the worker process before it masks its
  vector in that round; ``after:<round>`` ends it one second after its masked vector has
  gone (a hospital that dies between sending its input and the reveal stage);
  ``fail:<round>``: the fit answers an error that round and the worker lives on.
"""

from __future__ import annotations

import os

if os.environ.get("LEUKOFED_TEST_SPY_DIR") or os.environ.get("LEUKOFED_TEST_EXIT"):
    import threading
    from pathlib import Path

    import numpy as np

    import services.client.secure as secure

    _masked = secure.SecureSessions.masked

    def masked(self, cfg, like, tensors, weight, extras, **kw):  # type: ignore[no-untyped-def]
        purpose = cfg.secure["purpose"]
        spy = os.environ.get("LEUKOFED_TEST_SPY_DIR")
        if spy and purpose == "fit":
            np.savez(Path(spy) / f"{self.hospital}-{cfg.round}.npz", __weight=weight,
                     **{f"global/{k}": v for k, v in like.items()},
                     **{f"delta/{k}": v for k, v in tensors.items()})
        when, _, at = os.environ.get("LEUKOFED_TEST_EXIT", "").partition(":")
        if purpose == "fit" and at == str(cfg.round):
            if when == "before":
                os._exit(1)
            if when == "fail":  # answers an error and lives on
                from leukofed.secagg import SecAggError

                raise SecAggError("test", f"told to fail in round {at}")
            threading.Timer(1.0, os._exit, args=(1,)).start()
        return _masked(self, cfg, like, tensors, weight, extras, **kw)

    secure.SecureSessions.masked = masked
