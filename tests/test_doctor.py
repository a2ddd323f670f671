"""doctor: each check against this host's real kernel, netlink and an HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import fake_loaded_gtp5g, require_root

from gtp5g_op.cli import main
from gtp5g_op.kernel import patcher
from gtp5g_op.ops import doctor


@pytest.mark.root
def test_bpf_and_kernel_btf_are_ready_here():
    require_root("bpf() needs root")
    assert doctor.check_bpf().status == doctor.OK
    assert doctor.check_kernel_btf().status == doctor.OK


@pytest.mark.root
def test_fentry_probe_gives_a_real_answer():
    """This VM refuses fentry (measured: EPERM); a real host answers ok. Either way never 'unknown' here."""
    require_root("the fentry probe needs root")
    check = doctor.check_fentry()
    assert check.status in (doctor.OK, doctor.FAIL)
    if check.status == doctor.FAIL:
        assert "bpf_fentry_test1" in check.detail and check.fix


def test_module_checks_on_this_kernel():
    checks = doctor.check_module()
    assert checks[0].name == "gtp5g module" and checks[0].status == doctor.FAIL
    if not Path("/proc/modules").exists():
        assert "no loadable module support" in checks[0].detail
    assert [c.status for c in checks[1:]] == [doctor.UNKNOWN, doctor.UNKNOWN]


def test_module_checks_with_gtp5g_loaded(tmp_path):
    """A /proc and /sys with a patched gtp5g loaded: a test double, since gtp5g cannot be loaded here."""
    names = [s.name for s in patcher.load_export_set().functions]
    kallsyms = "".join(f"0 T {n}\t[gtp5g]\n0 r __ksymtab_{n}\t[gtp5g]\n" for n in names if n != "policePacket")
    proc, sys_root = fake_loaded_gtp5g(tmp_path, kallsyms, names, users=1)
    got = {c.name: c for c in doctor.check_module(proc=proc, sys_root=sys_root)}
    assert got["gtp5g module"].status == doctor.OK and "1 user" in got["gtp5g module"].detail
    assert got["gtp5g exports"].status == doctor.FAIL and "policePacket" in got["gtp5g exports"].detail
    assert got["gtp5g BTF"].status == doctor.OK


@pytest.mark.root
def test_devices_from_netlink():
    """A real veth named like the N3 interface; no gtp5g device can exist here (no module)."""
    require_root("creating a veth needs root")
    from pyroute2 import IPRoute

    name = "g5op-n3t0"
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="veth", peer="g5op-n3t1")
        try:
            got = {c.name: c for c in doctor.check_devices(n3=name)}
        finally:
            ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
    assert got[f"{name} interface"].status == doctor.OK
    assert got["gtp5g devices"].status == doctor.WARN and not got["gtp5g devices"].required


def test_api_check(gthulhu_server):  # noqa: F811
    assert doctor.check_api(gthulhu_server.url).status == doctor.OK
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check = doctor.check_api(f"http://127.0.0.1:{port}", timeout=1)
    assert check.status == doctor.FAIL and "GTP5G_OP_API_URL" in check.fix


def test_tools_and_tracefs():
    got = {c.name: c.status for c in doctor.check_tools()}
    assert set(got) == {"clang", "bpftool"}
    assert doctor.check_tracefs().status in (doctor.OK, doctor.FAIL)


def test_cli_doctor_json(gthulhu_server):  # noqa: F811
    res = CliRunner().invoke(main, ["doctor", "--json", "--api-url", gthulhu_server.url])
    doc = json.loads(res.output)
    by_name = {c["name"]: c for c in doc["checks"]}
    assert by_name["Gthulhu API"]["status"] == "ok"
    ready = all(c["status"] == "ok" for c in doc["checks"] if c["required"])
    assert doc["ready"] is ready and res.exit_code == (0 if ready else 1)
    res = CliRunner().invoke(main, ["doctor"], env={"GTP5G_OP_API_URL": gthulhu_server.url})
    assert "gtp5g-op doctor" in res.output and ("ready" in res.output)


def test_api_checks_name_the_kind_and_log_in(gthulhu_server, manager_server, tmp_path):
    from gthulhu_fixtures import MANAGER_PASSWORD, MANAGER_USER

    from gtp5g_op.config import load_settings

    legacy = {c.name: c for c in doctor.api_checks(load_settings(env={}, api_url=gthulhu_server.url,
                                                                  public_key=gthulhu_server.public_key))}
    assert "legacy Gthulhu API server" in legacy["Gthulhu API"].detail and legacy["API login"].ok
    env = {"GTP5G_OP_USERNAME": MANAGER_USER, "GTP5G_OP_PASSWORD": MANAGER_PASSWORD}
    checks = {c.name: c for c in doctor.api_checks(load_settings(env=env, api_url=manager_server.url,
                                                                  dm_url=manager_server.dm_url,
                                                                  public_key=manager_server.public_key))}
    assert "Gthulhu v1.x Manager" in checks["Gthulhu API"].detail
    assert checks["API login"].ok and MANAGER_USER in checks["API login"].detail and checks["Decision Maker"].ok
    wrong = {c.name: c for c in doctor.api_checks(load_settings(env={**env, "GTP5G_OP_PASSWORD": "nope"},
                                                                 api_url=manager_server.url))}
    assert wrong["API login"].status == doctor.FAIL and "invalid password" in wrong["API login"].detail
    mismatch = doctor.check_api(load_settings(env={}, api_url=manager_server.url, api_kind="legacy"))
    assert mismatch.status == doctor.FAIL and "--api manager" in mismatch.fix


def test_cli_doctor_honours_config(gthulhu_server, tmp_path):
    cfg = tmp_path / "op.toml"
    cfg.write_text(f'[api]\nurl = "{gthulhu_server.url}"\npublic_key = "{gthulhu_server.public_key}"\n')
    res = CliRunner().invoke(main, ["doctor", "--json", "--config", str(cfg)], env={"GTP5G_OP_API_URL": ""})
    by_name = {c["name"]: c for c in json.loads(res.output)["checks"]}
    assert gthulhu_server.url in by_name["Gthulhu API"]["detail"] and by_name["API login"]["status"] == "ok"


def test_a_url_too_long_for_the_table_at_80_columns_stays_whole(tmp_path):
    """``doctor --api-url http://gthulhu-api.gthulhu.svc:80`` (the in-cluster URL of docs/config.md) at
    80 columns folded "POST http://gthulhu-api.gthulhu.svc:80/api/v1/auth/l" | "ogin:" inside the table.
    Replayed with an address that refuses at once: the same length, no name resolution involved."""
    with socket.socket(socket.AF_INET6) as s:  # a port nothing listens on
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    url = f"http://[0000:0000:0000:0000:0000:0000:0000:0001]:{port}"
    res = CliRunner().invoke(main, ["doctor", "--api-url", url, "--public-key", str(tmp_path / "none.pub")],
                             env={"COLUMNS": "80"})
    assert res.exit_code == 1, res.output
    assert f"{url}/api/v1/auth/token" in res.output or f"{url}/api/v1/auth/login" in res.output, res.output
    assert "fix: " in res.output and "tracefs" in res.output
    res = CliRunner().invoke(main, ["doctor"], env={"COLUMNS": "80", "GTP5G_OP_API_URL": "http://127.0.0.1:9"})
    assert "┃ check" in res.output  # a URL that fits: still the table
