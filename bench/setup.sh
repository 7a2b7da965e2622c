#!/usr/bin/env bash
# Installs what the benchmark needs, on demand (bench/run.py calls this when something is missing).
#
#   bench/setup.sh            # system tools + peer proxies
#   bench/setup.sh system     # only: nginx wrk tinyproxy curl (Debian packages, needs root)
#   bench/setup.sh peers      # only: mitmproxy + proxy.py (+ py-spy) in bench/.venv-peers
#
# The peers live in their own venv so mitmproxy's pinned dependencies never touch the
# project's .venv. Nothing here is needed by `bench/run.py --smoke`.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
WHAT="${1:-all}"
PY="${PYTHON:-python3}"

install_system() {
    local missing=()
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/bin/tinyproxy ] || [ -x /usr/sbin/tinyproxy ] || missing+=(tinyproxy)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    if [ ${#missing[@]} -eq 0 ]; then
        echo "setup: system tools present"
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        SUDO=sudo
    else
        SUDO=
    fi
    echo "setup: apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # Any daemon the packages started is left alone: the bench runs its own instances on free ports.
}

install_peers() {
    local venv="$HERE/.venv-peers"
    if [ ! -x "$venv/bin/python" ]; then
        echo "setup: creating $venv"
        "$PY" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade pip
    fi
    if [ -x "$venv/bin/mitmdump" ] && [ -x "$venv/bin/proxy" ] && [ -x "$venv/bin/py-spy" ]; then
        echo "setup: peer proxies present"
        return 0
    fi
    echo "setup: pip install mitmproxy proxy.py py-spy into $venv"
    "$venv/bin/python" -m pip install -q mitmproxy proxy.py py-spy
}

case "$WHAT" in
    all) install_system; install_peers ;;
    system) install_system ;;
    peers) install_peers ;;
    *) echo "usage: $0 [all|system|peers]" >&2; exit 2 ;;
esac
