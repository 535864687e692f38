"""The inference service's side of "approved for serving" (``leukofed.approval``).

With the aggregator's public key configured, a version reached through an alias is served
only when its tag ``leukofed.approval.<alias>`` holds the aggregator's approval for exactly
that model, version, alias and signed ONNX digest, not expired, and with a sequence number
not lower than the newest this service has seen. The newest sequence number is kept in the
ONNX cache folder, so a restarted replica does not forget it either. A version without such
an approval is not served (the previous one keeps serving) and is asked about again at each
poll: the aggregator's watcher approves or reverts a move made in the MLflow UI within its
interval (issue 26, finding 6).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from leukofed.approval import Approval, NotApproved, approval_tag, check_approval
from registry.client import VersionInfo
from registry.publish import safe_name

log = logging.getLogger(__name__)


class ServingApprovals:
    def __init__(self, public_key: Any, alias: str, state_dir: Path) -> None:
        self.public_key = public_key
        self.alias = alias
        self.path = Path(state_dir) / "approvals.json"  # {"<model>@<alias>": newest seq}
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        try:
            loaded = json.loads(self.path.read_text())
            self._seen = {str(k): int(v) for k, v in loaded.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self._seen = {}

    def _key(self, model: str) -> str:
        return f"{safe_name(model)}@{self.alias}"

    def newest(self, model: str) -> int:
        return self._seen.get(self._key(model), 0)

    def check(self, info: VersionInfo, onnx_sha256: str) -> Approval:
        """The approval that lets ``info`` be served under the alias; NotApproved otherwise.
        An accepted approval raises the newest sequence number seen."""
        approval = check_approval(self.public_key, info.tags.get(approval_tag(self.alias)),
                                  model=info.name, version=info.version, alias=self.alias,
                                  onnx_sha256=onnx_sha256, min_seq=self.newest(info.name))
        self._remember(info.name, approval.seq)
        return approval

    def observe(self, info: VersionInfo, onnx_sha256: str | None) -> None:
        """The served version's approval was renewed: remember its newer sequence number
        (nothing happens when it does not hold; the served model keeps serving)."""
        if not onnx_sha256:
            return
        try:
            self.check(info, onnx_sha256)
        except NotApproved as exc:
            log.debug("served version %s: %s", info.version, exc)

    def _remember(self, model: str, seq: int) -> None:
        with self._lock:
            key = self._key(model)
            if seq <= self._seen.get(key, 0):
                return
            self._seen[key] = seq
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self._seen))
                os.replace(tmp, self.path)
            except OSError as exc:  # a read-only cache: still remembered in memory
                log.warning("cannot keep the newest approval seen in %s: %s", self.path, exc)
