# Sourced by scripts/quickstart and scripts/test: install what gtp5g-op needs into ./.venv.
# GTP5G_OP_APT: space-separated extra Debian packages to install when running as root.
# GTP5G_OP_EXTRAS: pip extras to install (e.g. "test").
set -euo pipefail

apt_install() {
    # Debian packages, only as root on a machine with apt; elsewhere say what is missing.
    [ "$#" -gt 0 ] || return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        return 0
    fi
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    echo "setup: apt-get install ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || { echo "setup: error: $PY not found; fix: install python3 (3.11+)" >&2; exit 3; }
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "setup: error: $("$PY" -V) is too old; fix: use Python 3.11+ (PYTHON=python3.11)" >&2; exit 3; }

# venv + headers + a C compiler for the optional parser accelerator (system Python only).
if [ "$("$PY" -c 'import sys; print(sys.prefix)')" = /usr ]; then
    apt_install python3-venv python3-dev gcc libc6-dev
fi
# shellcheck disable=SC2086
apt_install ${GTP5G_OP_APT:-}

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv || { echo "setup: error: cannot create .venv; fix: apt-get install python3-venv" >&2; exit 3; }
fi
.venv/bin/python -m pip install -q --upgrade pip >&2
spec="."
[ -z "${GTP5G_OP_EXTRAS:-}" ] || spec=".[${GTP5G_OP_EXTRAS}]"
.venv/bin/python -m pip install -q -e "$spec" >&2
.venv/bin/python -c 'import gtp5g_op.trace.parser as t; print("setup: parser accelerator:", "C" if t.TraceParser().accelerated else "pure Python (no C compiler)")' >&2
export PATH="$PWD/.venv/bin:$PATH"
