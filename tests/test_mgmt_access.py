"""Access control and TLS of a real server on 127.0.0.1:0: tokens per scope, TLS and mTLS round trips."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging

import grpc
import pytest

from lorad.base_model import BaseModelConfig
from lorad.clients import Client, LoradRPCError
from lorad.errors import ConfigError, PermissionDeniedError, UnauthenticatedError
from lorad.server.auth import AccessPolicy, is_loopback, read_secret
from lorad.server.config import EngineConfig, ServerConfig
from lorad.testing import ServerThread, write_random_adapter

ADMIN, API = "admin-" + "a" * 32, "api-" + "b" * 32
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


def _config(adapters_dir, **server):
    engine = EngineConfig(max_seq_len=128, kv_cache_memory="16MiB", max_lora_rank=8, max_loras=2, max_cpu_loras=4)
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=None, adapters_dir=str(adapters_dir),
                        base=BaseModelConfig(), engine=engine, **server)


def _secret(path, text):
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny_geometry):
    root = tmp_path_factory.mktemp("adapters")
    write_random_adapter(root / "a0", tiny_geometry, rank=4, seed=0, b_std=0.5)
    return root


@pytest.fixture(scope="module")
def token_server(tiny_base, adapters_dir, tmp_path_factory):
    secrets = tmp_path_factory.mktemp("secrets")
    cfg = _config(adapters_dir, admin_token_file=_secret(secrets / "admin", ADMIN),
                  api_token_file=_secret(secrets / "api", API))
    with ServerThread(cfg, tiny_base) as srv:
        yield f"127.0.0.1:{srv.port}"


def _code(fn):
    try:
        fn()
    except LoradRPCError as err:
        return err.code
    return "ok"


@pytest.mark.parametrize("token, generate, manage", [
    (None, UNAUTH, UNAUTH),
    ("wrong-" + "c" * 32, UNAUTH, UNAUTH),
    (API, "ok", DENIED),  # an inference token cannot manage adapters
    (ADMIN, "ok", "ok"),  # the admin token may do both
])
def test_token_matrix(token_server, token, generate, manage, monkeypatch, caplog):
    monkeypatch.delenv("LORAD_TOKEN", raising=False)
    caplog.set_level(logging.DEBUG)
    with Client(token_server, timeout=30, token=token) as c:
        assert c.health() == "SERVING"  # health stays open
        assert c.health(service="lorad.v1.AdapterManager") == "SERVING"
        assert _code(lambda: c.generate("hi", max_new_tokens=2)) == generate
        assert _code(lambda: c.list_adapters()) == generate
        assert _code(lambda: c.get_adapter("a0")) == manage
    for secret in (ADMIN, API):
        assert secret not in caplog.text  # tokens are never logged


def test_token_from_environment(token_server, monkeypatch):
    monkeypatch.setenv("LORAD_TOKEN", ADMIN)
    with Client(token_server, timeout=30) as c:
        assert c.get_adapter("a0").id == "a0"


def test_refusal_sentences_say_what_to_do():
    wide = AccessPolicy(loopback_only=False)
    refusal = wide.refusal("/lorad.v1.AdapterManager/LoadAdapter", ())
    assert isinstance(refusal, PermissionDeniedError) and "--admin-token-file" in str(refusal)
    assert wide.refusal("/lorad.v1.Generator/Generate", ()) is None
    assert wide.refusal("/grpc.health.v1.Health/Check", ()) is None
    assert AccessPolicy(loopback_only=True).refusal("/lorad.v1.AdapterManager/LoadAdapter", ()) is None
    tokens = AccessPolicy(admin_token=ADMIN, api_token=API, loopback_only=False)
    assert isinstance(tokens.refusal("/lorad.v1.AdapterManager/X", [("authorization", "Basic " + ADMIN)]),
                      UnauthenticatedError)
    assert tokens.refusal("/lorad.v1.AdapterManager/X", [("authorization", "bearer " + ADMIN)]) is None
    assert tokens.refusal("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", ()) is None
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "0.0.0.0", "10.1.2.3", "example.com")] \
        == [True, True, True, True, False, False, False]


def test_bad_secret_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        read_secret(_secret(tmp_path / "empty", ""), "admin_token_file")
    with pytest.raises(ConfigError, match="shorter than 16"):
        read_secret(_secret(tmp_path / "short", "abc"), "admin_token_file")
    with pytest.raises(ConfigError, match="admin_token_file: .* is not a file"):
        _config(tmp_path, admin_token_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        _config(tmp_path, tls_cert=_secret(tmp_path / "c", "x" * 20))


# --- TLS ----------------------------------------------------------------------------------------


def _cert(tmp_path, name, issuer=None, ca=False):
    """A PEM certificate for 127.0.0.1/localhost (self-signed, or signed by issuer=(cert, key))."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert, key, str(cert_path), str(key_path)


def test_tls_and_mtls_round_trips(tiny_base, adapters_dir, tmp_path):
    ca_cert, ca_key, ca_pem, _ = _cert(tmp_path, "ca", ca=True)
    _, _, server_pem, server_key = _cert(tmp_path, "server", issuer=(ca_cert, ca_key))
    _, _, client_pem, client_key = _cert(tmp_path, "client", issuer=(ca_cert, ca_key))
    _, _, stranger_pem, stranger_key = _cert(tmp_path, "stranger")  # self-signed: not from our CA

    with ServerThread(_config(adapters_dir, tls_cert=server_pem, tls_key=server_key), tiny_base) as srv:
        target = f"127.0.0.1:{srv.port}"
        with Client(target, timeout=30, tls_ca=ca_pem) as c:
            assert c.generate("hi", max_new_tokens=2).completion_tokens >= 1
            assert c.get_adapter("a0").id == "a0"  # loopback-only server: management open
        with Client(target, timeout=5) as plaintext:
            assert _code(lambda: plaintext.generate("hi", max_new_tokens=2)) == grpc.StatusCode.UNAVAILABLE
        with Client(target, timeout=5, tls_ca=stranger_pem) as wrong_ca:
            assert _code(lambda: wrong_ca.generate("hi", max_new_tokens=2)) == grpc.StatusCode.UNAVAILABLE

    mtls = _config(adapters_dir, tls_cert=server_pem, tls_key=server_key, tls_client_ca=ca_pem)
    with ServerThread(mtls, tiny_base) as srv:
        target = f"127.0.0.1:{srv.port}"
        with Client(target, timeout=30, tls_ca=ca_pem, client_cert=client_pem, client_key=client_key) as c:
            assert c.generate("hi", max_new_tokens=2).completion_tokens >= 1
        with Client(target, timeout=5, tls_ca=ca_pem) as no_cert:
            assert _code(lambda: no_cert.generate("hi", max_new_tokens=2)) == grpc.StatusCode.UNAVAILABLE
        with Client(target, timeout=5, tls_ca=ca_pem, client_cert=stranger_pem, client_key=stranger_key) as stranger:
            assert _code(lambda: stranger.generate("hi", max_new_tokens=2)) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("token, words", [(None, "UNAUTHENTICATED"), (API, "PERMISSION_DENIED")])
def test_train_push_without_the_admin_token_fails_before_training(token_server, tmp_path, token, words):
    """`lorad train --push` checks the token with an admin call first: a wrong one costs seconds,
    not a training run whose upload is then refused."""
    from pathlib import Path

    from click.testing import CliRunner

    from lorad.cli import main

    example = Path(__file__).resolve().parents[1] / "trainer" / "examples" / "storyteller.yaml"
    args = ["train", str(example), "--push", token_server, "--set", f"output_dir={tmp_path / 'out'}"]
    result = CliRunner().invoke(main, args + (["--token", token] if token else []), env={"LORAD_TOKEN": None})
    assert result.exit_code == 1, result.output
    assert "refuses adapter uploads from this client" in result.output and words in result.output
    assert "nothing was trained" in result.output and not (tmp_path / "out").exists()
