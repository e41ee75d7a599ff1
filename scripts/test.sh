#!/usr/bin/env bash
# The test command: sets up .venv (pinned torch and triton, the CUDA build
# where a toolkit exists), then runs the default test tier on up to 4 pytest
# workers (pytest-xdist; one test file a worker, so a file's fixtures are
# built once). Extra arguments go to pytest; TFK_LONG_TESTS=1 adds the long
# tier; TFK_TEST_WORKERS sets the number of workers (1: one process, for pdb).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
cores=$(nproc 2>/dev/null || echo 1)
workers="${TFK_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
parallel=()
if [ "$workers" -gt 1 ]; then
  parallel=(-n "$workers" --dist loadfile)
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${parallel[@]}" "$@"
