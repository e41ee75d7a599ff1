#!/usr/bin/env bash
# The test command: sets up .venv (pinned torch and triton, the CUDA build
# where a toolkit exists), then runs the default test tier. Extra arguments
# go to pytest; TFK_LONG_TESTS=1 adds the long tier.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
