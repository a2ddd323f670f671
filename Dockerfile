# gtp5g-op watcher: one container per UPF node runs `gtp5g-op watch --push` (deploy/kubernetes/).
#
#   docker build -t gtp5g-op:0.1.0 .
#   docker run --rm gtp5g-op:0.1.0 --version
#
# Runs as root inside the container, on purpose: tracefs (trace_pipe, private instances, the
# bpf_trace_printk event switch) is root-only, and so are BPF loads. "Non-root where possible" is
# not possible for this process; the DaemonSet therefore drops every capability and adds back only:
#   CAP_SYS_ADMIN     create/remove the private tracefs instance; mount tracefs where the host has not
#   CAP_BPF           load the BPF tracer (--with-tracer)
#   CAP_PERFMON       attach it (fentry/fexit, tracepoints) and read trace output
#   CAP_SYS_PTRACE    read /proc/<pid>/exe, status and threads of other users' processes (hostPID)
#   CAP_SYS_RESOURCE  raise RLIMIT_MEMLOCK for BPF maps on kernels older than 5.11
# and needs the host's PID namespace (hostPID) so that the PIDs it pushes are the host's.
# The tracer build tools below (clang, llvm, libbpf, bpftool) serve `watch --with-tracer`, which
# compiles the tracer sources shipped in the wheel against the node's own BTF
# (/sys/kernel/btf/vmlinux) at start-up, into $XDG_CACHE_HOME/gtp5g-op/tracer.
FROM python:3.11-slim-bookworm AS wheel
# Build stage: the wheel, with the trace parser's optional C accelerator compiled (gcc stays here).
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/gtp5g-op
COPY pyproject.toml setup.cfg setup.py README.md ./
COPY src/ src/
COPY tracer/ tracer/
COPY patches/ patches/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends clang llvm libbpf1 libbpf-dev bpftool \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/var/cache/gtp5g-op

COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels && gtp5g-op --version

LABEL org.opencontainers.image.title="gtp5g-op" \
      org.opencontainers.image.description="Trace free5GC gtp5g and push Gthulhu scheduling strategies, one watcher per UPF node" \
      org.opencontainers.image.licenses="Apache-2.0"

# Prometheus metrics, /healthz (readiness) and /livez (liveness).
EXPOSE 9464
ENTRYPOINT ["gtp5g-op"]
CMD ["watch", "--push", "-v", "--log-format", "json", "--metrics-port", "9464"]
