"""The metrics port: Prometheus `/metrics` plus the `/health` and `/ready` probes.

Balancers (HAProxy `option httpchk GET /ready`) and Kubernetes (`httpGet` probes) read the probes
here, on the port that answers even while the gRPC port is busy or not yet serving. The probe
answers come from lorad.server.readiness, the one place that decides them.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from lorad.server.readiness import PROBE_PATHS, Readiness


def make_app(registry: CollectorRegistry, readiness: Readiness | None):
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if readiness is not None and path in PROBE_PATHS:
            status, body = readiness.probe(path)
            data = body.encode()
            reason = "OK" if status == 200 else "Service Unavailable"
            start_response(f"{status} {reason}", [("Content-Type", "application/json"),
                                                  ("Content-Length", str(len(data))),
                                                  ("Cache-Control", "no-store")])
            return [data]
        return metrics_app(environ, start_response)

    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up shutdown


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # health checks every second would flood the log
        pass


def serve(app, host: str, port: int) -> WSGIServer:
    """Serve a WSGI app on a daemon thread; returns the server (server_port, shutdown())."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(_ThreadingServer):
        address_family = family  # an IPv6 host needs an AF_INET6 socket

    server = make_server(sockaddr[0], port, app, Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="lorad-metrics-http", daemon=True).start()
    return server
