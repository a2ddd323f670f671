"""``gtp5g_op.userfiles``: every kind of bad path gives its own one-line UsageError (exit 2), on real files.

Permission is tested as a real unprivileged user (a forked child that drops to uid/gid 65534), since
root reads any file whatever its mode.
"""

from __future__ import annotations

import os
import threading

import pytest

from gtp5g_op import userfiles
from gtp5g_op.errors import EXIT_USAGE, UsageError


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(UsageError) as info:
        call(*args, **kwargs)
    assert info.value.exit_code == EXIT_USAGE
    line = info.value.one_line()
    assert "\n" not in line and "; fix: " in line
    return line


def test_a_good_text_file_is_read(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xef\xbb\xbf[api]\nurl = \"http://x\"\n")  # a byte-order mark is dropped
    assert userfiles.read_text(path, "config file") == '[api]\nurl = "http://x"\n'
    link = tmp_path / "link.toml"
    link.symlink_to(path)  # Kubernetes mounts ConfigMaps as symlinks
    assert userfiles.read_text(link, "config file").startswith("[api]")


def test_missing_and_dangling_symlink(tmp_path):
    assert f"config file {tmp_path}/none.toml does not exist; fix: check the path" in refused(
        userfiles.read_text, tmp_path / "none.toml", "config file")
    line = refused(userfiles.read_text, tmp_path / "a" / "b" / "c.toml", "config file")
    assert f"({tmp_path}/a/b does not exist either)" in line
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert "is a symlink to" in refused(userfiles.read_text, tmp_path / "dangling", "config file")
    assert "custom advice" in refused(userfiles.read_text, tmp_path / "none", "x", fix="custom advice")


def test_wrong_kinds(tmp_path):
    assert "is a directory, not a regular file" in refused(userfiles.read_text, tmp_path, "config file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = threading.Event()

    def read_fifo():  # must be refused at once, not wait for a writer
        try:
            refused(userfiles.read_text, fifo, "config file")
        finally:
            done.set()

    threading.Thread(target=read_fifo, daemon=True).start()
    assert done.wait(5), "a FIFO given as a file blocked"
    assert "is a character device, not a regular file" in refused(userfiles.read_bytes, "/dev/null", "key")
    # streams accept FIFOs, not directories
    fd = userfiles.open_fd(fifo, "trace pipe", kinds=userfiles.STREAMS)
    os.close(fd)
    assert "not a regular file or a FIFO" in refused(userfiles.check, tmp_path, "trace pipe",
                                                       kinds=userfiles.STREAMS)
    (tmp_path / "file").write_text("x")
    assert "is a regular file, not a directory" in refused(userfiles.check, tmp_path / "file", "source tree",
                                                          kinds={userfiles.DIRECTORY})


def test_binary_non_utf8_and_too_big(tmp_path):
    binary = tmp_path / "k.der"
    binary.write_bytes(b"0\x82\x01\x22\x00\x01")
    assert "is binary data, not text (a NUL byte at offset 4)" in refused(userfiles.read_text, binary, "public key")
    latin = tmp_path / "c.toml"
    latin.write_bytes(b"name = \"caf\xe9\"\n")
    assert "is not UTF-8 text (byte 0xe9 at offset 11)" in refused(userfiles.read_text, latin, "config file")
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * 2048)
    assert "is larger than 1024 bytes" in refused(userfiles.read_text, big, "export set", limit=1024)


def test_binary_evidence_tolerates_a_garbage_line_in_a_stream():
    text = b"nr-gnb-1 [000] .... 1.0: bpf_trace_printk: stop\n" * 50
    assert userfiles.binary_evidence(text, strict=False) is None
    assert userfiles.binary_evidence(text + b"\x00\x01 garbage\n", strict=False) is None
    assert "a NUL byte" in userfiles.binary_evidence(text + b"\x00", strict=True)
    noise = bytes(range(256)) * 64  # every byte value equally often, as in compressed or random data
    assert userfiles.binary_evidence(noise, strict=False) == (
        "1856 of its first 16384 bytes (11%) are NUL or control bytes")


def test_unreadable_as_an_unprivileged_user(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to uid 65534: not running as root")
    secret = tmp_path / "secret.toml"
    secret.write_text("[api]\n")
    secret.chmod(0o600)
    tmp_path.chmod(0o755)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, try, report the line
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                userfiles.read_text(secret, "config file")
                os.write(w, b"read it")
            except UsageError as exc:
                os.write(w, f"{exc.exit_code} {exc.one_line()}".encode())
                code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        out = fh.read().decode()
    os.waitpid(pid, 0)
    assert out.startswith("2 ") and "is not readable by uid 65534 (permission denied)" in out, out
    assert f"ls -l {secret}" in out
