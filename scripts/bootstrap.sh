#!/usr/bin/env bash
# Create or reuse .venv and install extguard with its demo and test extras.
#
# Sourced by scripts/demo and scripts/test. Installs only what is missing, so a second run
# takes a second or two. System packages: redis-server (the budget store's tests start their
# own instance) comes from apt when it is not on PATH and apt-get is available.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo_root/.venv"
python_bin=${PYTHON:-python3}

if ! "$python_bin" -c 'import sys; raise SystemExit(sys.version_info < (3, 11))'; then
    echo "error: extguard needs Python 3.11 or newer; $python_bin is $("$python_bin" --version 2>&1)." >&2
    echo "Set PYTHON=/path/to/python3.11 and run again." >&2
    exit 1
fi

if ! command -v redis-server >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        sudo_cmd=""
        [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
        echo "Installing redis-server with apt-get ..."
        $sudo_cmd apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq redis-server >/dev/null
    else
        echo "warning: redis-server is not installed and apt-get is not available; tests that need Redis will fail." >&2
    fi
fi

# See scripts/repair-otel-protos.sh: xds-protos overwrites opentelemetry-proto's files.
repair_otel_protos() {
    "$repo_root/scripts/repair-otel-protos.sh" "$1"
}

if [ ! -x "$venv/bin/python" ]; then
    echo "Creating $venv ..."
    "$python_bin" -m venv "$venv"
fi

# Reinstall when pyproject.toml changes; the stamp records the hash of the last install.
stamp="$venv/.extguard-install-stamp"
wanted=$(sha256sum "$repo_root/pyproject.toml" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    echo "Installing extguard and its dependencies into $venv ..."
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e "$repo_root[test]"
    repair_otel_protos "$venv"
    echo "$wanted" > "$stamp"
fi

export PATH="$venv/bin:$PATH"
