"""GthulhuClient against the test server over real HTTP: tokens, renewal, retries, errors, secrecy."""

from __future__ import annotations

import logging
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gtp5g_op.errors import EXIT_API, ApiError, UsageError
from gtp5g_op.gthulhu.legacy import GthulhuClient

ENTRY = {"priority": True, "execution_time": 20000000, "pid": 4321}


def _client(server, **kw) -> GthulhuClient:
    return GthulhuClient(server.url, server.public_key.read_bytes(), **kw)


def _other_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("shape", ["old", "new"])
def test_round_trip_with_either_token_shape(gthulhu_server, shape):
    gthulhu_server.control(token_shape=shape)
    with _client(gthulhu_server) as client:
        assert client.health()["status"] == "healthy"
        client.post_strategies([ENTRY])
        assert client.list_strategies() == [ENTRY]
        assert client.pods_pids()[0]["pod_name"] == "ueransim-gnb-0"
        assert client.token_renewals == 1


def test_token_is_renewed_ahead_of_expiry(gthulhu_start):
    server = gthulhu_start("--token-lifetime", "2")
    client = _client(server)
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline:
        client.list_strategies()
        time.sleep(0.25)
    stats = server.state()["stats"]
    assert stats["tokens_issued"] >= 2 and client.token_renewals == stats["tokens_issued"]
    assert "token_expired" not in stats  # renewed before the server ever saw an expired token


def test_a_401_renews_once_and_retries(gthulhu_server):
    client = _client(gthulhu_server)
    client.list_strategies()
    gthulhu_server.control(fault="401-next")
    client.post_strategies([ENTRY])
    assert client.token_renewals == 2 and gthulhu_server.pids() == {4321}


def test_5xx_burst_is_retried_with_backoff(gthulhu_server):
    client = _client(gthulhu_server, retries=3, backoff_factor=0.05)
    client.authenticate()
    gthulhu_server.control(fault="500", count=3)
    client.post_strategies([ENTRY])
    assert gthulhu_server.pids() == {4321}


def test_persistent_5xx_names_url_status_and_server_message(gthulhu_server):
    client = _client(gthulhu_server, retries=1, backoff_factor=0.01)
    client.authenticate()
    gthulhu_server.control(fault="500")
    with pytest.raises(ApiError) as err:
        client.list_strategies()
    text = err.value.one_line()
    assert f"GET {gthulhu_server.url}/api/v1/scheduling/strategies: HTTP 500" in text
    assert "injected fault: internal server error" in text
    assert err.value.exit_code == EXIT_API


def test_slow_server_does_not_hang_past_the_timeout(gthulhu_server):
    client = _client(gthulhu_server, timeout=(1, 0.5), retries=1, backoff_factor=0.01)
    client.authenticate()
    gthulhu_server.control(fault="slow", slow_seconds=3)
    started = time.monotonic()
    with pytest.raises(ApiError, match=r"no answer within 1\.\d s \(2 tries, each waiting at most 0\.5 s"):
        client.list_strategies()
    assert time.monotonic() - started < 2.0  # 2 tries x 0.5 s + backoff, not 3 s per try


def test_garbage_down_and_refused_are_api_errors(gthulhu_server):
    client = _client(gthulhu_server, retries=0)
    client.authenticate()
    gthulhu_server.control(fault="bad-json")
    with pytest.raises(ApiError, match="not a JSON object"):
        client.list_strategies()
    gthulhu_server.control(fault="down")  # accepted, then closed without an answer
    with pytest.raises(ApiError, match="the connection broke before a complete answer"):
        client.list_strategies()
    gthulhu_server.control(fault=None)
    gthulhu_server.stop()
    with pytest.raises(ApiError, match="cannot connect"):
        client.list_strategies()


def test_wrong_public_key_is_a_clear_error(gthulhu_server):
    with pytest.raises(ApiError) as err:
        GthulhuClient(gthulhu_server.url, _other_pem()).list_strategies()
    assert "HTTP 401: Public key verification failed" in err.value.message
    assert "public key of the server at --api-url" in err.value.fix
    with pytest.raises(UsageError, match="not a PEM public key"):
        GthulhuClient(gthulhu_server.url, b"hello")


def test_token_signed_by_another_key_is_refused(gthulhu_server):
    gthulhu_server.control(fault="foreign-token")
    with pytest.raises(ApiError, match="not a valid RS256 JWT signed by the given public key"):
        _client(gthulhu_server).authenticate()


def _self_signed(tmp_path):
    """A self-signed certificate for 127.0.0.1 (cert path, key path)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gthulhu-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_https_is_verified_by_default(tmp_path, gthulhu_start):
    cert, key = _self_signed(tmp_path)
    server = gthulhu_start("--tls-cert", str(cert), "--tls-key", str(key))
    assert server.url.startswith("https://")
    with pytest.raises(ApiError) as err:
        _client(server, retries=0).list_strategies()
    assert "TLS verification failed" in err.value.message and "--ca-bundle" in err.value.fix
    _client(server, ca_bundle=str(cert)).post_strategies([ENTRY])
    assert _client(server, insecure=True).list_strategies() == [ENTRY]


def test_token_never_appears_in_repr_errors_or_logs(gthulhu_server, caplog):
    caplog.set_level(logging.DEBUG)
    client = _client(gthulhu_server, retries=1, backoff_factor=0.01)
    client.post_strategies([ENTRY])
    token = client._token.reveal()
    assert token and token not in repr(client)
    messages = []
    for fault in ("500", "bad-json", "401-next", "down"):
        gthulhu_server.control(fault=fault)
        try:
            client.list_strategies()
        except ApiError as exc:
            messages.append(exc.one_line())
    gthulhu_server.control(fault=None)
    messages.append(repr(client))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "GET /api/v1/scheduling/strategies" in logged  # urllib3 debug lines were captured
    for text in messages + [logged]:
        assert token not in text and token[:20] not in text
