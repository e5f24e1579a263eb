"""Who may call what: bearer tokens per scope, checked by one server interceptor; TLS credentials.

Scopes (by gRPC service):
  * admin      lorad.v1.AdapterManager. With --admin-token-file, callers need that token. Without
               it, management is refused (PERMISSION_DENIED, with how to enable it) unless the
               server listens on loopback only, where every local user may manage adapters.
  * inference  lorad.v1.Generator. Open, unless --api-token-file is given; then callers need
               that token or the admin token (UNAUTHENTICATED otherwise).
  * open       grpc.health.v1.Health and server reflection: always open (orchestrators probe them).

A token travels as `authorization: Bearer <token>` metadata. Tokens are compared in constant
time and never logged or echoed. Over a network, use TLS (--tls-cert/--tls-key), or the token
crosses it in clear; --tls-client-ca additionally requires client certificates (mTLS).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

from lorad.errors import ConfigError, PermissionDeniedError, UnauthenticatedError

from lorad.server.status import status_for

log = logging.getLogger(__name__)

ADMIN_SERVICE = "lorad.v1.AdapterManager"
INFERENCE_SERVICE = "lorad.v1.Generator"


def read_secret(path: str | Path, field_name: str) -> str:
    """A token from a file (surrounding whitespace stripped); refuses an empty or unreadable file."""
    path = Path(path)
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{field_name}: cannot read {path}: {exc}") from exc
    if not text:
        raise ConfigError(f"{field_name}: {path} is empty")
    if len(text) < 16:
        raise ConfigError(f"{field_name}: the token in {path} is shorter than 16 characters; use a long random one "
                          "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    _warn_if_shared(path, field_name)
    return text


def _warn_if_shared(path: Path, field_name: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s: %s is readable by other users; chmod 600 it", field_name, path)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""
    return None


def _same(a: str, b: str | None) -> bool:
    return b is not None and hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True)
class AccessPolicy:
    admin_token: str | None = None
    api_token: str | None = None
    loopback_only: bool = True

    def refusal(self, method: str, metadata) -> Exception | None:
        """The error a call to `method` ("/package.Service/Method") gets, or None to let it through."""
        service = method.lstrip("/").split("/", 1)[0]
        if service == ADMIN_SERVICE:
            return self._admin(bearer_token(metadata))
        if service == INFERENCE_SERVICE and self.api_token is not None:
            token = bearer_token(metadata)
            if token is None:
                return UnauthenticatedError("this server needs a token: send the metadata 'authorization: Bearer <token>'")
            if not (_same(token, self.api_token) or _same(token, self.admin_token)):
                return UnauthenticatedError("the token is not valid for this server")
        return None

    def _admin(self, token: str | None) -> Exception | None:
        if self.admin_token is None:
            if self.loopback_only:
                return None
            return PermissionDeniedError(
                "adapter management is disabled: this server listens beyond loopback and was started without "
                "--admin-token-file; restart it with --admin-token-file FILE (and --tls-cert/--tls-key), "
                "or bind it to 127.0.0.1")
        if token is None:
            return UnauthenticatedError(
                "adapter management needs the admin token: send the metadata 'authorization: Bearer <token>'")
        if _same(token, self.admin_token):
            return None
        if _same(token, self.api_token):
            return PermissionDeniedError("this token may generate but not manage adapters; use the admin token")
        return UnauthenticatedError("the token is not valid for adapter management")


def _aborting(handler: grpc.RpcMethodHandler, error: Exception) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with `error`'s status."""
    code, message = status_for(error), str(error)

    async def abort(_request, context):
        await context.abort(code, message)

    kinds = [
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
    ]
    for behaviour, make in kinds:
        if behaviour is not None:
            return make(abort, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    raise AssertionError("a method handler with no behaviour")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, policy: AccessPolicy, on_refusal=None):
        self.policy = policy
        self.on_refusal = on_refusal  # called with the status name, for metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        error = self.policy.refusal(handler_call_details.method, handler_call_details.invocation_metadata)
        if error is None:
            return handler
        if self.on_refusal is not None:
            self.on_refusal(status_for(error).name.lower())
        return _aborting(handler, error)


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None = None) -> grpc.ServerCredentials:
    """TLS (and mTLS with client_ca_file) credentials from PEM files."""
    def read(path: str, field_name: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{field_name}: cannot read {path}: {exc}") from exc

    key = read(key_file, "tls_key")
    _warn_if_shared(Path(key_file), "tls_key")
    return grpc.ssl_server_credentials(
        [(key, read(cert_file, "tls_cert"))],
        root_certificates=read(client_ca_file, "tls_client_ca") if client_ca_file else None,
        require_client_auth=client_ca_file is not None,
    )


def policy_from(admin_token_file: str | None, api_token_file: str | None, host: str) -> AccessPolicy:
    return AccessPolicy(
        admin_token=read_secret(admin_token_file, "admin_token_file") if admin_token_file else None,
        api_token=read_secret(api_token_file, "api_token_file") if api_token_file else None,
        loopback_only=is_loopback(host),
    )


