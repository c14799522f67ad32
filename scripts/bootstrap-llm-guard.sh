#!/usr/bin/env bash
# Create or reuse .venv-llm-guard: extguard with the llm-guard extra, for its adapter's tests.
#
# Sourced by scripts/test after bootstrap.sh. A separate environment, because llm-guard pins an
# older presidio-analyzer than the `presidio` extra installs, and the evaluation should compare
# against the current Presidio. torch is installed first and pinned, because otherwise pip would
# pick the newest torch for llm-guard, which on Linux is the multi-GB CUDA build. Where pip's
# configuration offers a CPU build of the pinned version, pip takes that one.
set -euo pipefail

llm_guard_venv="$repo_root/.venv-llm-guard"
torch_requirement=${EXTGUARD_TORCH:-torch==2.13.0}

if [ ! -x "$llm_guard_venv/bin/python" ]; then
    echo "Creating $llm_guard_venv ..."
    "$python_bin" -m venv "$llm_guard_venv"
fi

llm_guard_stamp="$llm_guard_venv/.extguard-install-stamp"
llm_guard_wanted="$(sha256sum "$repo_root/pyproject.toml" | cut -d' ' -f1) $torch_requirement"
if [ ! -f "$llm_guard_stamp" ] || [ "$(cat "$llm_guard_stamp")" != "$llm_guard_wanted" ]; then
    echo "Installing $torch_requirement and extguard[test,llm-guard] into $llm_guard_venv ..."
    "$llm_guard_venv/bin/python" -m pip install --quiet --upgrade pip
    "$llm_guard_venv/bin/python" -m pip install --quiet "$torch_requirement"
    "$llm_guard_venv/bin/python" -m pip install --quiet -e "$repo_root[test,llm-guard]"
    repair_otel_protos "$llm_guard_venv"
    echo "$llm_guard_wanted" > "$llm_guard_stamp"
fi
