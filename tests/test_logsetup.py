"""JSON logs: one object per line, stable keys, no secrets (tokens are redacted wherever they appear)."""

from __future__ import annotations

import json
import logging

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gtp5g_op.ops.logs import JSON_KEYS, REDACTED, redact, setup_logging


@pytest.fixture
def token() -> str:
    """A real RS256 JWT, shaped like the ones the Gthulhu API hands out."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode({"client_id": "gtp5g-op", "iss": "bss-api-server", "exp": 2_000_000_000}, key,
                      algorithm="RS256")


class Stderr:
    """What the handler wrote to (pytest-captured) stderr."""

    def __init__(self, capsys):
        self.capsys = capsys

    def getvalue(self) -> str:
        return self.capsys.readouterr().err


@pytest.fixture
def capture(capsys):
    """Set logging up as the CLI does, on captured stderr; restore the root logger afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def start(fmt: str = "json", verbose: int = 1) -> Stderr:
        setup_logging(verbose, fmt)
        return Stderr(capsys)

    yield start
    root.handlers[:], level = saved
    root.setLevel(level)


def records(stream: Stderr) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_have_stable_keys_in_order(capture):
    stream = capture("json")
    log = logging.getLogger("gtp5g_op.test")
    log.info("pushed %d strategies", 22, extra={"fields": {"targets": 2, "threads": 22, "msg": "no override"}})
    log.warning("plain")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    docs = records(stream)
    assert len(docs) == 3  # one object per line
    for doc in docs:
        assert tuple(doc)[:4] == JSON_KEYS
        assert doc["ts"].endswith("Z") and "T" in doc["ts"]
        assert doc["logger"] == "gtp5g_op.test"
    assert docs[0]["msg"] == "pushed 22 strategies"  # fields cannot override the fixed keys
    assert docs[0]["level"] == "info" and docs[0]["targets"] == 2 and docs[0]["threads"] == 22
    assert docs[1]["level"] == "warning"
    assert "ValueError: boom" in docs[2]["exc"]


def test_debug_only_with_verbose(capture):
    stream = capture("json", verbose=0)
    logging.getLogger("gtp5g_op.test").info("hidden")
    logging.getLogger("gtp5g_op.test").warning("shown")
    assert [d["msg"] for d in records(stream)] == ["shown"]


def test_tokens_are_redacted_in_messages_args_fields_and_tracebacks(capture, token):
    stream = capture("json")
    log = logging.getLogger("gtp5g_op.gthulhu.legacy")
    log.info("got token %s", token)
    log.info(f"sending Authorization: Bearer {token}")
    log.info("request", extra={"fields": {
        "headers": {"Authorization": f"Bearer {token}", "Accept": "application/json"},
        "token": "not-even-jwt-shaped",
        "note": f"renewed {token} ok",
        "history": [token, 3],
    }})
    try:
        raise RuntimeError(f"401 for Bearer {token}")
    except RuntimeError:
        log.exception("push failed")
    text = stream.getvalue()
    docs = [json.loads(line) for line in text.splitlines()]
    assert token not in text and "not-even-jwt-shaped" not in text
    for part in token.split("."):  # no piece of the token survives either
        assert part not in text
    assert docs[0]["msg"] == f"got token {REDACTED}"
    assert docs[1]["msg"] == f"sending Authorization: Bearer {REDACTED}"
    assert docs[2]["headers"] == {"Authorization": REDACTED, "Accept": "application/json"}
    assert docs[2]["token"] == REDACTED
    assert docs[2]["note"] == f"renewed {REDACTED} ok"
    assert docs[2]["history"] == [REDACTED, 3]
    assert "RuntimeError: 401 for Bearer [redacted]" in docs[3]["exc"]


def test_text_format_is_redacted_too(capture, token):
    stream = capture("text")
    logging.getLogger("gtp5g_op.gthulhu.legacy").warning("token=%s", token)
    assert stream.getvalue() == f"gtp5g-op: WARNING: token={REDACTED}\n"


def test_redact_leaves_ordinary_text_alone():
    text = "nr-gnb pid=4242 tgid=4240 pushed to http://gthulhu-api.default.svc/api/v1/x (eyJ alone is fine)"
    assert redact(text) == text
    pem = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----"
    assert redact(f"key: {pem} end") == f"key: {REDACTED} end"
    public = "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----"
    assert redact(public) == public  # the public key is not a secret


# --- hostile text (issue 11 item 5, the log half) ----------------------------------------------------

HOSTILE = "/tmp/x\ngtp5g-op: WARNING: forged line\r\x1b[2J\x1b]0;pwned\x07\u202eevil\u2028\udcff"


def test_text_logs_escape_control_characters_so_no_line_can_be_forged(capture):
    stream = capture("text")
    log = logging.getLogger("gtp5g_op.trace.pipeline")
    log.warning("rejected pid %d (%s): executable %s", 42, "nr-gnb\x1b[31m", HOSTILE)
    try:
        raise ValueError(f"bad path {HOSTILE}")
    except ValueError:
        log.exception("failed on %s", HOSTILE)
    text = stream.getvalue()
    lines = text.splitlines()
    assert lines[0] == ("gtp5g-op: WARNING: rejected pid 42 (nr-gnb\\x1b[31m): executable /tmp/x\\ngtp5g-op: "
                        "WARNING: forged line\\r\\x1b[2J\\x1b]0;pwned\\x07\\u202eevil\\u2028\\xff")
    assert sum(line.startswith("gtp5g-op:") for line in lines) == 2  # no forged line
    assert all(line.startswith("    ") for line in lines[2:])  # the traceback, indented
    assert not any(c in text for c in "\r\x1b\x07\u202e\u2028")
    assert "    ValueError: bad path /tmp/x\n    gtp5g-op: WARNING: forged line" in text  # indented, not forged


def test_json_logs_stay_one_json_object_per_line_with_hostile_text(capture):
    stream = capture("json")
    logging.getLogger("gtp5g_op.x").warning("path %s", HOSTILE, extra={"fields": {"exe": HOSTILE}})
    raw = stream.getvalue()
    assert raw.count("\n") == 1 and "\x1b" not in raw
    doc = json.loads(raw)
    assert doc["msg"] == f"path {HOSTILE}" and doc["exe"] == HOSTILE  # escaped in JSON, exact when decoded


def test_one_line_errors_escape_control_characters():
    from gtp5g_op.errors import UsageError, escape_control

    err = UsageError(f"replay file {HOSTILE} does not exist", "give a path")
    line = err.one_line()
    assert "\n" not in line and "\x1b" not in line and "\\x1b[2J" in line and "\\u202e" in line
    assert escape_control("plain text, tabs\tand C:\\path") == "plain text, tabs\\tand C:\\path"
