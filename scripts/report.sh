#!/usr/bin/env bash
# The main job: sets up .venv, then reports every op on the best backend
# available here, its error against the float64 reference, and its time.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python -m bench.report "$@"
