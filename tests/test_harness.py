"""The test harness itself: a failure reproduces from its test id (seeds are
the same in every process), and a backend's tests skip only where it cannot
exist on the machine, never because its build is missing or broken."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _pytest.outcomes import Skipped

import helpers


def test_seeds_are_the_same_in_every_process():
    """Another process, with another string-hash seed, draws the same seed."""
    code = "import helpers; print(helpers.stable_seed('longformer', (2, 4, 2, 97, 97, 40, 40)))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(helpers.stable_seed("longformer", (2, 4, 2, 97, 97, 40, 40)))


def test_a_broken_sim_build_fails_instead_of_skipping(monkeypatch):
    monkeypatch.setattr(helpers, "sim_missing_reason", lambda: None)  # a compiler exists

    def broken(name):
        raise ImportError(f"{name}: invalid ELF header")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ImportError, match="invalid ELF header"):
        helpers.require_backend("cuda-sim")


def test_no_compiler_skips_and_says_why(monkeypatch):
    monkeypatch.setattr(helpers.shutil, "which", lambda name: None)
    with pytest.raises(Skipped, match="no C.. compiler"):
        helpers.require_backend("cuda-sim")
