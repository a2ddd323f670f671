"""The Gthulhu test server behaves like the API it stands in for (real HTTP, real subprocess)."""

from __future__ import annotations

import time

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


STRATS = "/api/v1/scheduling/strategies"


def _token(server, pem: bytes | None = None) -> requests.Response:
    pem = pem if pem is not None else server.public_key.read_bytes()
    return requests.post(server.url + "/api/v1/auth/token", json={"public_key": pem.decode()}, timeout=5)


def _auth(server) -> dict:
    return {"Authorization": "Bearer " + _token(server).json()["token"]}


def test_token_old_and_new_shapes_are_rs256_with_claims(gthulhu_server):
    old = _token(gthulhu_server).json()
    assert old["success"] is True and isinstance(old["token"], str)
    key = serialization.load_pem_public_key(gthulhu_server.public_key.read_bytes())
    claims = jwt.decode(old["token"], key, algorithms=["RS256"])
    assert claims["iss"] == "bss-api-server" and claims["exp"] - claims["iat"] == 86400

    gthulhu_server.control(token_shape="new")
    new = _token(gthulhu_server).json()
    assert "token" not in new and jwt.decode(new["data"]["token"], key, algorithms=["RS256"])["exp"] == new["data"]["expired_at"]


def test_token_refuses_other_key_and_bad_json(gthulhu_server):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pem = other.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    resp = _token(gthulhu_server, pem)
    assert resp.status_code == 401 and "Public key verification failed" in resp.json()["error"]
    resp = requests.post(gthulhu_server.url + "/api/v1/auth/token", data=b"{nope", timeout=5)
    assert resp.status_code == 400


def test_api_needs_a_valid_unexpired_token(gthulhu_start):
    server = gthulhu_start("--token-lifetime", "1")
    assert requests.get(server.url + STRATS, timeout=5).status_code == 401
    assert requests.get(server.url + STRATS, headers={"Authorization": "Bearer abc"}, timeout=5).status_code == 401
    headers = _auth(server)
    assert requests.get(server.url + STRATS, headers=headers, timeout=5).status_code == 200
    time.sleep(2.1)
    resp = requests.get(server.url + STRATS, headers=headers, timeout=5)
    assert resp.status_code == 401 and "expired" in resp.json()["error"]


def test_post_replaces_and_get_expands_selectors_like_the_real_server(gthulhu_server):
    headers = _auth(gthulhu_server)
    # default: the selector strategy expands to the nr-gnb process of the demo pod, not its bash
    got = requests.get(gthulhu_server.url + STRATS, headers=headers, timeout=5).json()["scheduling"]
    assert got == [{"priority": True, "execution_time": 20000000, "pid": 4242, "selectors": [{"key": "app", "value": "ueransim-macvlan"}]}]

    body = {"strategies": [
        {"priority": True, "execution_time": 20000000, "pid": 7, "owner": "ignored"},
        {"priority": False, "execution_time": 5, "selectors": [{"key": "app", "value": "nobody"}], "command_regex": "x"},
        {"priority": True, "execution_time": 1},  # neither pid nor selectors: stored, never returned
    ]}
    assert requests.post(gthulhu_server.url + STRATS, json=body, headers=headers, timeout=5).json()["success"]
    got = requests.get(gthulhu_server.url + STRATS, headers=headers, timeout=5).json()["scheduling"]
    assert got == [{"priority": True, "execution_time": 20000000, "pid": 7}]  # unknown field dropped, selector gone
    assert len(gthulhu_server.state()["strategies"]) == 3
    requests.post(gthulhu_server.url + STRATS, json={"strategies": []}, headers=headers, timeout=5)
    assert requests.get(gthulhu_server.url + STRATS, headers=headers, timeout=5).json()["scheduling"] is None

    bad = requests.post(gthulhu_server.url + STRATS, json={"strategies": [{"priority": "yes"}]}, headers=headers, timeout=5)
    assert bad.status_code == 400
    pods = requests.get(gthulhu_server.url + "/api/v1/pods/pids", headers=headers, timeout=5).json()["pods"]
    assert pods[0]["processes"][0] == {"pid": 4242, "command": "nr-gnb"}


def test_faults_switch_at_run_time(gthulhu_server):
    headers = _auth(gthulhu_server)
    url = gthulhu_server.url + STRATS

    gthulhu_server.control(fault="500", count=2)
    assert [requests.get(url, headers=headers, timeout=5).status_code for _ in range(3)] == [500, 500, 200]

    gthulhu_server.control(fault="bad-json")
    resp = requests.get(url, headers=headers, timeout=5)
    with pytest.raises(ValueError):
        resp.json()

    gthulhu_server.control(fault="401-next")
    assert [requests.get(url, headers=headers, timeout=5).status_code for _ in range(2)] == [401, 200]

    gthulhu_server.control(fault="down")
    with pytest.raises(requests.ConnectionError):
        requests.get(url, headers=headers, timeout=5)

    gthulhu_server.control(fault="slow", slow_seconds=0.6)
    started = time.monotonic()
    assert requests.get(url, headers=headers, timeout=5).status_code == 200
    assert time.monotonic() - started >= 0.6

    state = gthulhu_server.control(fault=None)
    assert state["fault"] is None and state["stats"]["fault:500"] == 2
    assert requests.post(gthulhu_server.url + "/_control", json={"fault": "fire"}, timeout=5).status_code == 400


def test_restart_keeps_key_and_port_and_resets_strategies(gthulhu_server):
    headers = _auth(gthulhu_server)
    requests.post(gthulhu_server.url + STRATS, json={"strategies": [{"priority": True, "execution_time": 1, "pid": 9}]}, headers=headers, timeout=5)
    url, pem = gthulhu_server.url, gthulhu_server.public_key.read_bytes()
    gthulhu_server.restart()
    assert gthulhu_server.url == url and gthulhu_server.public_key.read_bytes() == pem
    assert requests.get(url + STRATS, headers=headers, timeout=5).status_code == 200  # old token still verifies
    assert gthulhu_server.pids() == set()
