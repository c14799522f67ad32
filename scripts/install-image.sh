#!/usr/bin/env bash
# Install extguard into a new virtual environment at $1: the install step of the Dockerfile.
#
# Run from the project folder (the Docker build context). EXTRAS names optional extras, for
# example "presidio" or "presidio,llm-guard"; empty installs the inline detectors only. The
# tests run this script into a temporary folder, since no Docker engine runs there.
set -euo pipefail

target=${1:?usage: install-image.sh TARGET_VENV}
extras=${EXTRAS:-}
python_bin=${PYTHON:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

"$python_bin" -m venv "$target"
"$target/bin/python" -m pip install --quiet --upgrade pip
spec="."
if [ -n "$extras" ]; then
    spec=".[$extras]"
fi
"$target/bin/python" -m pip install --quiet "$spec"
"$here/repair-otel-protos.sh" "$target"
# Compile now: the image's root filesystem is read-only at run time.
"$target/bin/python" -m compileall -q "$target/lib" >/dev/null
