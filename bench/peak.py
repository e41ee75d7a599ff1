"""Peak resident memory of one step, in a fresh process (the CPU benches'
"peak MiB"): the parent runs ``python -m <module> --memory-child ARGS``; the
child builds its inputs, calls ``report_step_peak(step)``, which resets the
peak resident set (/proc/self/clear_refs), runs the step and prints the peak
(VmHWM) minus the resident set before it: what one step adds at its peak,
allocator caching and library workspaces included."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_threads():
    """In the child, first: the parent's --threads (TFK_BENCH_THREADS), when set."""
    if os.environ.get("TFK_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["TFK_BENCH_THREADS"]))


def report_step_peak(step):
    """In the child: run step() once and print {"peak_mib": ...} (see the module doc)."""
    with open("/proc/self/clear_refs", "w") as fh:   # resets the peak (VmHWM) to the current RSS
        fh.write("5")
    before = _status_mib("VmRSS")
    step()
    print(json.dumps({"peak_mib": _status_mib("VmHWM") - before}))


def child_peak_mib(module, *args):
    """In the parent: MiB one step adds at its peak in a fresh ``python -m module
    --memory-child *args``, or "n/a (the child's last error line)"."""
    r = subprocess.run([sys.executable, "-m", module, "--memory-child", *map(str, args)],
                       capture_output=True, text=True, cwd=_ROOT)
    if r.returncode:
        return f"n/a ({(r.stderr.strip().splitlines() or ['?'])[-1][:80]})"
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mib"]
