#!/usr/bin/env bash
# Put back the files of opentelemetry-proto in the virtual environment given as $1.
#
# xds-protos ships an old copy of the opentelemetry/proto modules. When pip installs it after
# opentelemetry-proto, it replaces that package's files, and the OTLP exporter cannot load.
# Reinstalling the installed opentelemetry-proto version without dependencies restores them.
set -euo pipefail

venv=${1:?usage: repair-otel-protos.sh VENV}
version=$("$venv/bin/python" -m pip show opentelemetry-proto 2>/dev/null | sed -n 's/^Version: //p')
if [ -n "$version" ]; then
    "$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "opentelemetry-proto==$version"
fi
