"""Is the server alive, and should a balancer send it requests? One answer for every transport.

    starting --(base loaded, engine running)--> ready --(SIGTERM / stop)--> draining
        any --(the engine loop ended without a stop)--> failed

live  = not failed: a Kubernetes livenessProbe restarts a failed server, never a slow-loading one
        (loading can take minutes; a startupProbe covers that).
ready = state is ready: a balancer or Kubernetes sends new requests only then. Draining servers
        are not ready but keep serving what they have (and, for `drain_seconds`, what still
        arrives while balancers notice), so no request is cut.

`probe(path)` answers `GET /health` and `GET /ready` as (HTTP status, JSON body). The metrics
port serves it today (lorad.server.metrics_http); the HTTP API serves the same function, so
every port gives the same answer. The gRPC health service is driven from the same state
(lorad.server.app).
"""

from __future__ import annotations

import json
import threading
import time

STARTING, READY, DRAINING, FAILED = "starting", "ready", "draining", "failed"
PROBE_PATHS = ("/health", "/ready")


class Readiness:
    """Thread-safe: the event loop changes it, HTTP probe threads and the engine's exit hook read
    and change it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._state = STARTING
        self._reason = "loading the base model"
        self._since = time.time()

    def _set(self, state: str, reason: str) -> None:
        with self._lock:
            if self._state == FAILED or (self._state == DRAINING and state != FAILED):
                return  # no way back: a failed or draining server never turns ready again
            self._state, self._reason, self._since = state, reason, time.time()

    def mark_ready(self) -> None:
        self._set(READY, "")

    def begin_drain(self) -> None:
        self._set(DRAINING, "shutting down: finishing in-flight requests")

    def engine_ended(self) -> None:
        """The engine loop ended: expected while draining, a failure otherwise."""
        with self._lock:
            draining = self._state == DRAINING
        if not draining:
            self._set(FAILED, "the engine loop ended; see the server log")

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def live(self) -> bool:
        return self.state != FAILED

    def probe(self, path: str) -> tuple[int, str]:
        """(HTTP status, JSON body) for GET /health (liveness) or GET /ready (readiness)."""
        with self._lock:
            state, reason, since = self._state, self._reason, self._since
        if path == "/health":
            ok = state != FAILED
        elif path == "/ready":
            ok = state == READY
        else:
            raise ValueError(f"path: {path!r} is not one of {', '.join(PROBE_PATHS)}")
        body = {"status": state, "ok": ok, "since": round(since, 3)}
        if reason:
            body["reason"] = reason
        return (200 if ok else 503), json.dumps(body)
