#!/usr/bin/env bash
# Creates .venv with the pinned stack and builds tfk into it (editable).
# Idempotent: re-runs pip only when requirements change, and the build only
# when setup.py, csrc/ or the arch list change. Source it or run it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv with $($py --version)"
  "$py" -m venv "$venv"
fi
pip_q=(-q --disable-pip-version-check)
req_hash=$(cat requirements.txt requirements-test.txt | sha1sum | cut -c1-16)
if [ "$(cat "$venv/.tfk-req" 2>/dev/null)" != "$req_hash" ]; then
  echo "[setup] installing the pinned stack (torch, triton, test tools)"
  "$venv/bin/pip" install "${pip_q[@]}" -r requirements.txt -r requirements-test.txt
  echo "$req_hash" > "$venv/.tfk-req"
fi
build_hash=$( (cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat; echo "${TFK_CUDA_ARCHS:-}${TFK_BUILD_CUDA:-}") | sha1sum | cut -c1-16)
if [ "$(cat "$venv/.tfk-build" 2>/dev/null)" != "$build_hash" ] || ! "$venv/bin/python" -c "import tfk" 2>/dev/null; then
  echo "[setup] building tfk (editable)"
  start=$(date +%s)
  "$venv/bin/pip" install "${pip_q[@]}" --no-build-isolation --no-deps -e .
  echo "[setup] build took $(( $(date +%s) - start )) s"
  echo "$build_hash" > "$venv/.tfk-build"
fi
