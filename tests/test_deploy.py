"""Deployment artefacts: the Kustomize base and overlays, and the container image's command.

Manifests are rendered twice when a kustomize is on PATH (``kubectl kustomize`` or ``kustomize
build``): by it, and by :func:`render`, a small renderer of the subset the kustomizations use
(``resources`` and JSON 6902 ``patches``, applied with the ``jsonpatch`` library); the two must agree.
Without a kustomize binary, :func:`render` alone is used. Every rendered object is then validated
against the Kubernetes OpenAPI schemas by ``kubernetes-validate`` in strict mode.

There is no Docker engine here (and no Kubernetes), so the image is checked by parsing the Dockerfile
with ``dockerfile-parse`` and by running its exact ENTRYPOINT + CMD on this machine, configured as the
DaemonSet configures it, against the Gthulhu test server.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import jsonpatch
import kubernetes_validate
import pytest
import requests
import yaml
from conftest import ROOT, host_pids, require_root
from dockerfile_parse import DockerfileParser

KUSTOMIZE = ROOT / "deploy" / "kubernetes"
BUILDS = ["base", "overlays/example", "overlays/gthulhu-helm"]
# Oldest Kubernetes still commonly run with free5GC labs, and the newest schemas the validator ships.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "patches"}


# ---------------------------------------------------------------- rendering


def render(directory: Path) -> list[dict]:
    """Render a kustomization that uses only ``resources`` and JSON 6902 ``patches``.

    This is the subset the project's kustomizations are kept to, so that they render faithfully here
    without a kustomize binary; anything else in a kustomization is an error, not silently ignored.
    """
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED_KEYS
    assert not unknown, f"{directory}: {sorted(unknown)} is outside the renderable subset"
    objects: list[dict] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kust.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text()) if "path" in patch else yaml.safe_load(patch["patch"])
        assert isinstance(ops, list), f"{directory}: only JSON 6902 patches (a list of operations)"
        hits = [i for i, obj in enumerate(objects) if _selected(obj, patch["target"])]
        assert hits, f"{directory}: patch target {patch['target']} matches nothing"
        for i in hits:
            objects[i] = jsonpatch.apply_patch(objects[i], ops)
    return objects


def _selected(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    meta = obj["metadata"]
    want = {"group": group, "version": version, "kind": obj["kind"], "name": meta["name"],
            "namespace": meta.get("namespace")}
    return all(want[key] == value for key, value in target.items())


def kustomize_command() -> list[str] | None:
    """A real kustomize on PATH, if any."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        probe = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True, timeout=60, check=False)
        if probe.returncode == 0:
            return ["kubectl", "kustomize"]
    return None


def by_identity(objects: list[dict]) -> dict[tuple, dict]:
    out = {}
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        assert key not in out, f"duplicate object {key}"
        out[key] = obj
    return out


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[tuple, dict]]:
    return {build: by_identity(render(KUSTOMIZE / build)) for build in BUILDS}


def daemonset(objects: dict[tuple, dict]) -> dict:
    return objects[("apps/v1", "DaemonSet", "gtp5g-op", "gtp5g-op")]


def container(objects: dict[tuple, dict]) -> dict:
    return daemonset(objects)["spec"]["template"]["spec"]["containers"][0]


def env(objects: dict[tuple, dict]) -> dict[str, dict]:
    return {e["name"]: e for e in container(objects)["env"]}


# ---------------------------------------------------------------- manifests


@pytest.mark.parametrize("build", BUILDS)
def test_real_kustomize_agrees_with_the_renderer(build, rendered):
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("no kustomize or kubectl on PATH: rendered with the built-in JSON 6902 renderer only")
    out = subprocess.run([*cmd, str(KUSTOMIZE / build)], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert by_identity([d for d in yaml.safe_load_all(out.stdout) if d]) == rendered[build]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("build", BUILDS)
def test_rendered_objects_pass_kubernetes_schemas_strictly(build, version, rendered):
    for key, obj in rendered[build].items():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{build} {key} against {version}: {exc.message} at {list(exc.path)}")


def test_secret_template_passes_schemas_and_is_not_applied(rendered):
    secret = yaml.safe_load((KUSTOMIZE / "base" / "secret.yaml").read_text())
    kubernetes_validate.validate(secret, "1.30.0", strict=True)
    assert "PLACEHOLDER" in secret["stringData"]["public.pem"]
    assert all(kind != "Secret" for _, kind, _, _ in rendered["base"])  # would clobber the real key


def test_daemonset_wiring(rendered):
    """What the schemas cannot see: names that must agree across objects."""
    objs = rendered["base"]
    ds = daemonset(objs)
    pod = ds["spec"]["template"]["spec"]
    ctr = container(objs)
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["hostPID"] is True
    assert pod["serviceAccountName"] in {name for (_, kind, _, name) in objs if kind == "ServiceAccount"}

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
    assert set(mounts.values()) == set(volumes)
    host_paths = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    assert {"/sys/kernel/tracing", "/sys/kernel/debug", "/sys/fs/bpf", "/sys/kernel/btf"} <= host_paths

    caps = ctr["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert set(caps["add"]) == {"SYS_ADMIN", "BPF", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE"}
    # Kubernetes rejects allowPrivilegeEscalation=false together with CAP_SYS_ADMIN.
    assert "allowPrivilegeEscalation" not in ctr["securityContext"]

    port_names = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert port_names == {"metrics": 9464}
    assert ctr["args"][ctr["args"].index("--metrics-port") + 1] == "9464"
    probes = {kind: ctr[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert all(p["port"] == "metrics" for p in probes.values())
    assert probes["readinessProbe"]["path"] == "/healthz" and probes["livenessProbe"]["path"] == "/livez"
    assert ctr["resources"]["limits"]["memory"] and ctr["resources"]["requests"]["cpu"]

    svc = objs[("v1", "Service", "gtp5g-op", "gtp5g-op-metrics")]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"

    # The config file and the public key are where the ConfigMap says.
    config_path = Path(env(objs)["GTP5G_OP_CONFIG"]["value"])
    assert mounts[str(config_path.parent)] == "config"
    assert volumes["config"]["configMap"]["name"] == "gtp5g-op-config"
    toml_text = objs[("v1", "ConfigMap", "gtp5g-op", "gtp5g-op-config")]["data"][config_path.name]
    doc = tomllib.loads(toml_text)
    assert mounts[str(Path(doc["api"]["public_key"]).parent)] == "api-key"
    assert volumes["api-key"]["secret"]["secretName"] == "gthulhu-api-key"
    assert mounts[doc["push"]["state_dir"]] == "state"
    # Locks and state on a writable volume (the root fs is read-only), the host's own /run/gtp5g-op.
    state_mount = next(m for m in ctr["volumeMounts"] if m["name"] == "state")
    assert not state_mount.get("readOnly") and ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert volumes["state"]["hostPath"] == {"path": "/run/gtp5g-op", "type": "DirectoryOrCreate"}
    # The metrics port binds the pod IP (the probes' and Prometheus' address), from the downward API.
    assert ctr["args"][ctr["args"].index("--metrics-addr") + 1] == "$(POD_IP)"
    assert env(objs)["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_configmap_toml_is_a_valid_gtp5g_op_config(rendered, tmp_path):
    """The ConfigMap's TOML goes through the real config loader (unknown keys would be errors)."""
    from gtp5g_op.config import load_settings

    cm = rendered["base"][("v1", "ConfigMap", "gtp5g-op", "gtp5g-op-config")]
    path = tmp_path / "config.toml"
    path.write_text(cm["data"]["config.toml"])
    settings = load_settings(path, env={})
    assert settings.api_url == "http://gthulhu-api.default.svc"
    assert settings.public_key == Path("/etc/gtp5g-op/keys/public.pem")
    assert settings.policy.priority is True and settings.policy.execution_time_ns == 20_000_000
    assert settings.interval == 10.0
    # Anti-spoofing: the free5GC UERANSIM image's install path, absolute (docs/deploy.md).
    assert settings.exe_allow == ("/ueransim/nr-gnb", "/ueransim/nr-ue") and not settings.allow_user_writable_exe
    # The overlays override the URL through the environment, as the DaemonSet does.
    overlay_env = {e["name"]: e.get("value") for e in container(rendered["overlays/example"])["env"]}
    assert load_settings(path, env=overlay_env).api_url == "http://gthulhu-api.gthulhu.svc:80"


def test_example_overlay(rendered):
    objs = rendered["overlays/example"]
    pod = daemonset(objs)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "node-role.kubernetes.io/upf": ""}
    assert pod["tolerations"] == [{"key": "node-role.kubernetes.io/upf", "operator": "Exists", "effect": "NoSchedule"}]
    assert container(objs)["image"] == "registry.example.org/free5gc/gtp5g-op:0.1.0"
    assert container(objs)["args"][-1] == "--with-tracer"
    # Everything that is not patched is the base, untouched.
    assert {k for k in objs} == {k for k in rendered["base"]}
    assert objs[("v1", "ConfigMap", "gtp5g-op", "gtp5g-op-config")] == rendered["base"][("v1", "ConfigMap", "gtp5g-op", "gtp5g-op-config")]


def test_gthulhu_helm_overlay_logs_in_to_the_manager_of_a_helm_install(rendered, tmp_path):
    objs = rendered["overlays/gthulhu-helm"]
    variables = env(objs)
    assert variables["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}  # from the base
    assert variables["GTP5G_OP_API"]["value"] == "manager"
    assert variables["GTP5G_OP_API_URL"]["value"] == "http://gthulhu-manager.gthulhu.svc:8080"  # <release>-manager:8080
    assert variables["GTP5G_OP_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": "gthulhu-manager-credentials",
                                                                          "key": "username"}
    assert "GTP5G_OP_PASSWORD" not in variables  # the password is a mounted file, never an environment variable
    names = [e["name"] for e in container(objs)["env"]]
    assert len(names) == len(set(names))
    pod = daemonset(objs)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(objs)["volumeMounts"]}
    password = Path(variables["GTP5G_OP_PASSWORD_FILE"]["value"])
    secret = volumes[mounts[str(password.parent)]]["secret"]
    assert secret["secretName"] == "gthulhu-manager-credentials" and secret["items"] == [{"key": "password", "path": password.name}]
    assert set(mounts.values()) == set(volumes)

    service = objs[("v1", "Service", "gthulhu", "gthulhu-dm-local")]
    assert service["spec"]["internalTrafficPolicy"] == "Local" and service["spec"]["ports"][0]["port"] == 8080
    assert variables["GTP5G_OP_DM_URL"]["value"] == "http://gthulhu-dm-local.gthulhu.svc:8080"

    # The ConfigMap's TOML plus this environment make valid Manager settings for the node.
    from gtp5g_op.config import load_settings

    toml = tmp_path / "config.toml"
    toml.write_text(objs[("v1", "ConfigMap", "gtp5g-op", "gtp5g-op-config")]["data"]["config.toml"])
    (tmp_path / "password").write_text("s3cret\n")
    overlay_env = {k: v.get("value") for k, v in variables.items() if "value" in v}
    overlay_env |= {"NODE_NAME": "upf-1", "GTP5G_OP_USERNAME": "gtp5g-op", "GTP5G_OP_PASSWORD_FILE": str(tmp_path / "password")}
    settings = load_settings(toml, env=overlay_env)
    assert settings.api_kind == "manager" and settings.node_name == "upf-1" and settings.username == "gtp5g-op"
    assert settings.manager_password().reveal() == "s3cret" and settings.dm_url == "http://gthulhu-dm-local.gthulhu.svc:8080"


def test_manager_credentials_template_passes_schemas_and_is_not_applied(rendered):
    secret = yaml.safe_load((KUSTOMIZE / "overlays" / "gthulhu-helm" / "manager-credentials.yaml").read_text())
    kubernetes_validate.validate(secret, "1.30.0", strict=True)
    assert "PLACEHOLDER" in secret["stringData"]["password"]
    assert all(kind != "Secret" for _, kind, _, _ in rendered["overlays/gthulhu-helm"])


def test_renderer_refuses_what_it_cannot_render(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(AssertionError, match="commonLabels"):
        render(tmp_path)


# ---------------------------------------------------------------- the image


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return parser


def image_command(parser: DockerfileParser) -> list[str]:
    """ENTRYPOINT + CMD of the final stage, both in exec (JSON) form as the Dockerfile must use."""
    final = [i for i in parser.structure if i["instruction"] in ("ENTRYPOINT", "CMD")]
    last = {i["instruction"]: json.loads(i["value"]) for i in final}
    return last["ENTRYPOINT"] + last["CMD"]


def test_dockerfile_shape(dockerfile):
    assert dockerfile.baseimage == "python:3.11-slim-bookworm"
    assert image_command(dockerfile) == ["gtp5g-op", "watch", "--push", "-v", "--log-format", "json",
                                         "--metrics-port", "9464"]
    stages = [i["value"] for i in dockerfile.structure if i["instruction"] == "FROM"]
    assert stages == ["python:3.11-slim-bookworm AS wheel", "python:3.11-slim-bookworm"]
    final_runs = " ".join(i["value"] for i in dockerfile.structure[
        max(n for n, i in enumerate(dockerfile.structure) if i["instruction"] == "FROM"):]
        if i["instruction"] == "RUN")
    for package in ("clang", "llvm", "libbpf1", "libbpf-dev", "bpftool"):
        assert f" {package} " in f" {final_runs} ", package
    assert not [i for i in dockerfile.structure if i["instruction"] == "USER"]  # root, documented
    for cap in ("CAP_SYS_ADMIN", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"):
        assert cap in dockerfile.content
    assert dockerfile.labels["org.opencontainers.image.title"] == "gtp5g-op"


def dockerignored(rel: str) -> bool:
    """Is ``rel`` (relative to the repository) left out of the build context by .dockerignore?

    Covers the pattern forms the file uses: ``name``, ``dir/sub`` and ``**/glob``; no ``!`` exceptions.
    """
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "extend dockerignored() for ! patterns"
    parts = rel.split("/")
    for pat in patterns:
        if pat.startswith("**/"):
            if any(fnmatch.fnmatch(part, pat[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatch("/".join(parts[:n]), pat) for n in range(1, len(parts) + 1)):
            return True
    return False


def test_dockerignore_rules():
    assert dockerignored("src/gtp5g_op/_fastscan.cpython-311-x86_64-linux-gnu.so")
    assert dockerignored("src/gtp5g_op/__pycache__/x.pyc") and dockerignored("tracer/build/gtp5g.bpf.o")
    assert dockerignored(".git/config") and dockerignored("tests/test_deploy.py")
    assert not dockerignored("src/gtp5g_op/ops/metrics.py") and not dockerignored("tracer/gtp5g.bpf.c")


def test_dockerfile_copies_exist_and_are_not_ignored(dockerfile):
    """Every COPY source is in the build context and survives .dockerignore."""
    for instr in dockerfile.structure:
        if instr["instruction"] != "COPY" or instr["value"].startswith("--from="):
            continue
        *sources, _dest = instr["value"].split()
        for src in sources:
            rel = src.rstrip("/")
            assert (ROOT / rel).exists(), f"COPY {src}: not in the repository"
            assert not dockerignored(rel), f"COPY {src} is dockerignored"
    assert (ROOT / "src" / "gtp5g_op" / "data" / "tracer" / "gtp5g.bpf.c").is_file()  # shipped in the wheel


def build_context(parser: DockerfileParser, dest: Path) -> Path:
    """Lay out what the wheel stage COPYs, as Docker would (.dockerignore applied, links kept)."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        rel = Path(directory).relative_to(ROOT)
        return {n for n in names if dockerignored(str(rel / n))}

    dest.mkdir(parents=True)
    stages = 0
    for instr in parser.structure:
        stages += instr["instruction"] == "FROM"
        if stages > 1:
            break  # only the first (wheel) stage
        if instr["instruction"] != "COPY":
            continue
        *sources, target = instr["value"].split()
        for src in sources:
            origin, goal = ROOT / src.rstrip("/"), dest / target
            assert origin.exists(), f"COPY {src}: not in the repository"
            if origin.is_dir():
                shutil.copytree(origin, dest / src.rstrip("/"), symlinks=True, ignore=ignore)
            else:
                shutil.copy2(origin, goal / origin.name if target.endswith("/") else goal)
    return dest


def test_wheel_stage_without_docker(dockerfile, tmp_path):
    """The image's wheel stage and install step, run here: wheel from the COPYed files only, then
    installed (no dependencies: the system's serve) into a fresh virtual environment whose
    ``gtp5g-op`` entry point must run and find the tracer sources inside the installed package."""
    runs = [i["value"] for i in dockerfile.structure if i["instruction"] == "RUN"]
    assert any("pip wheel" in r and "--no-deps" in r for r in runs)
    context = build_context(dockerfile, tmp_path / "context")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--wheel-dir", str(wheels), str(context)], check=True, timeout=600)
    (wheel,) = wheels.glob("gtp5g_op-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)
    out = subprocess.run([str(venv / "bin" / "gtp5g-op"), "--version"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0 and "gtp5g-op" in out.stdout, out.stderr
    probe = ("import gtp5g_op, gtp5g_op.kernel.tracer_build as t; print(gtp5g_op.__file__); "
             "print(t.source_dir())")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, check=True)
    package, sources = out.stdout.split()
    assert package.startswith(str(venv)), "imported the source checkout, not the installed wheel"
    assert sources.startswith(str(venv)) and (Path(sources) / "gtp5g.bpf.c").is_file()


def docker_engine() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False).returncode == 0


@pytest.mark.slow
def test_docker_build_and_version():
    if not docker_engine():
        pytest.skip("no Docker engine reachable (this machine has only the client); the build is untested here")
    tag = "gtp5g-op:test"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, timeout=1800)
    out = subprocess.run(["docker", "run", "--rm", tag, "--version"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0 and "gtp5g-op" in out.stdout


@host_pids  # as the DaemonSet's hostPID: true
def test_image_command_runs_as_the_daemonset_configures_it(dockerfile, rendered, tmp_path):
    """Run the image's ENTRYPOINT + CMD here, configured like the DaemonSet, against the test server.

    Same command line, same ConfigMap TOML through GTP5G_OP_CONFIG, the API URL and key path through
    the environment (as the overlays set them). Only the paths that live in volumes in the pod
    (config, key, state, cache) point into a temporary directory. Live tracefs needs root.
    """
    require_root("the watch reads a live tracefs instance")
    from gtp5g_op.gthulhu.testserver import ServerState, load_or_create_key, make_server

    state = ServerState(load_or_create_key(None))
    server = make_server("127.0.0.1", 0, state)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    try:
        key = tmp_path / "public.pem"
        key.write_bytes(state.public_pem())
        config = tmp_path / "config.toml"
        config.write_text(rendered["base"][("v1", "ConfigMap", "gtp5g-op", "gtp5g-op-config")]["data"]["config.toml"])
        command = image_command(dockerfile)
        port = int(command[command.index("--metrics-port") + 1])
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} (the image's metrics port) is busy on this machine")
        environ = {k: v for k, v in os.environ.items() if not k.startswith("GTP5G_OP_")}
        environ.update(
            GTP5G_OP_CONFIG=str(config),
            GTP5G_OP_API_URL=f"http://127.0.0.1:{server.server_address[1]}",
            GTP5G_OP_PUBLIC_KEY=str(key),
            GTP5G_OP_STATE_DIR=str(tmp_path / "state"),
            XDG_CACHE_HOME=str(tmp_path / "cache"),
        )
        exe = shutil.which(command[0]) or str(Path(sys.executable).parent / command[0])
        proc = subprocess.Popen([exe, *command[1:]], env=environ, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            health = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                    if health.status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                time.sleep(0.3)
            assert proc.poll() is None, f"the image command exited early: {proc.communicate()[1][-2000:]}"
            assert health is not None and health.status_code == 200, health and health.text
            metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            assert "gtp5g_op_lines_total" in metrics and "gtp5g_op_pushes_total" in metrics
        finally:
            proc.send_signal(signal.SIGTERM)  # what the kubelet sends
            try:
                _, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, stderr = proc.communicate()
        assert proc.returncode == 0, stderr[-2000:]
        for line in filter(str.strip, stderr.splitlines()):  # --log-format json: one object per line
            doc = json.loads(line)
            assert list(doc)[:4] == ["ts", "level", "logger", "msg"]
        # It used the key and URL it was given: a token, then pushes (at start-up and the final one).
        assert state.stats.get("tokens_issued", 0) >= 1, state.stats
        assert state.stats.get("POST /api/v1/scheduling/strategies", 0) >= 1, state.stats
    finally:
        server.shutdown()
        server.server_close()
