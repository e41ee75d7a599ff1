"""Backend registry.

Each backend declares what it supports through ``reasons(call)``: the list of
reasons it cannot run a call, empty when it can. ``backend="auto"`` takes the
highest-priority backend with no reasons (the environment variable
``TFK_BACKEND`` replaces "auto" with a name); a named backend that cannot run
raises with every reason. When "auto" passes over a backend meant for the call
(its ``auto_for`` holds, and its refusals are not mere routing:
``routes_only``) because of a reason, it warns once per reason
(``FallbackWarning``). Backends also report the tiles at which they compute
scores to the counters of ``count_tiles()``.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch

from .patterns import Pattern


@dataclass
class AttentionCall:
    """A validated attention call in canonical form.

    q: (B, H, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv) with H % Hkv == 0.
    attn_mask: None, or bool/float broadcastable to (B, H, Lq, Lk).
    """
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pattern: Pattern | None
    attn_mask: torch.Tensor | None
    scale: float
    dropout_p: float
    return_lse: bool
    # {kind: modifier} of tfk.scores (validated against q, k), or None
    score_mod: dict | None = None


class Backend:
    name = "?"
    family = "attention"  # the kernel family it serves: "attention", "moe" or "linear"
    priority = 0          # higher wins under "auto"
    # True for a backend that "auto" takes only for the calls it can run: its
    # refusals route a call on to the next backend, and are no fallback
    routes_only = False
    # The tfk.scores modifier kinds (attention's score_mod) this backend fuses:
    # True for all, else a set of kinds
    score_mods = frozenset()

    def reasons(self, call: AttentionCall) -> list[str]:
        """Why this backend cannot run ``call``; empty when it can."""
        raise NotImplementedError

    def auto_for(self, call: AttentionCall) -> bool:
        """Whether "auto" may pick this backend for ``call`` (a backend that can
        run it may still be the wrong default, e.g. an interpreter on CPU)."""
        return True

    def run(self, call: AttentionCall):
        """Returns (out, lse): out (B, H, Lq, Dv) in q's dtype, lse (B, H, Lq) float32
        (float64 for float64 inputs), natural log."""
        raise NotImplementedError

    def block_functions(self, call: AttentionCall):
        """((block_q, block_k), forward, backward): the tiles of this backend's
        plans for ``call`` and the functions ``run`` wraps in autograd, for
        callers that drive the engine piece by piece (context parallelism).
        forward(q, k, v, plan, mask, scale, dropout_p, seed, window) -> (out,
        lse); backward(dout, dlse, q, k, v, out, lse, plan, mask, scale,
        dropout_p, seed, window) -> (dq, dk, dv), where out and lse may be
        those of a larger call that this one is a piece of (the gradients are
        then this piece's share), and ``window`` (a tfk.dropout.Window,
        default the whole call) places the piece in that call's dropout mask.
        None for a backend without them."""
        return None


_BACKENDS: dict[str, Backend] = {}
# Each kernel family's registry, by family name; attention's is _BACKENDS.
# register_backend adds a family on its first backend ("moe", "linear").
_FAMILIES: dict[str, dict[str, Backend]] = {"attention": _BACKENDS}

# Tests set this: outputs start as NaN, so an element a backend forgets to
# write fails the comparison instead of passing as 0.
POISON_OUTPUTS = os.environ.get("TFK_POISON_OUTPUTS") == "1"


_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_device_reasons(t) -> list[str]:
    """Why a Triton kernel cannot take tensor ``t`` here (MoE and linear
    attention): no triton, a device other than CUDA (CPU only in the
    interpreter), or bf16 in the interpreter. Empty when it can."""
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed"]
    if not t.is_cuda and not (t.device.type == "cpu" and _TRITON_INTERPRET):
        return [f"tensors on {t.device}: needs CUDA, or CPU tensors with TRITON_INTERPRET=1 set before tfk "
                "is imported"]
    if t.dtype == torch.bfloat16 and not t.is_cuda:
        return ["bfloat16 arithmetic is wrong in Triton's interpreter: bf16 runs on GPU only"]
    return []


_IMPORT_ERRORS: dict = {}


@torch.compiler.assume_constant_result
def import_error(module: str):
    """Why tfk.<module> cannot be imported, or None (a constant to torch.compile,
    which cannot trace an import)."""
    if module not in _IMPORT_ERRORS:
        try:
            importlib.import_module(f"tfk.{module}")
            _IMPORT_ERRORS[module] = None
        except ImportError as e:
            _IMPORT_ERRORS[module] = str(e)
    return _IMPORT_ERRORS[module]


def cuda_kernel_reasons(module: str, t) -> list[str]:
    """Why the CUDA C++ kernels cannot take tensor ``t`` through tfk.<module>:
    "_C" (backend "cuda": built, CUDA tensors on sm_80 or later) or "_sim"
    (backend "cuda-sim", the host-execution layer: built, CPU tensors). Every
    family's "cuda" and "cuda-sim" backends ask this first."""
    error = import_error(module)
    if error is not None:
        return [f"tfk.{module} is not built ({error}); reinstall tfk with a C++ compiler"
                + (", nvcc and a CUDA build of torch: CUDA_HOME=/path/to/cuda TFK_CUDA_ARCHS='8.0;9.0' "
                   "pip install --no-build-isolation ." if module == "_C" else "")]
    if module == "_sim":
        if t.device.type != "cpu":
            return [f"tensors on {t.device}: runs on CPU tensors (backend 'cuda' runs on the GPU)"]
        return []
    if not t.is_cuda:
        return [f"tensors on {t.device}: needs CUDA tensors (backend 'cuda-sim' runs the kernels on CPU)"]
    major, minor = torch.cuda.get_device_capability(t.device)
    if major < 8:
        return [f"GPU sm_{major}{minor}: the kernels use sm_80 instructions (mma.sync bf16, cp.async)"]
    return []


def new_output(shape, dtype, device):
    """An output buffer every element of which the backend must write."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def register_backend(backend: Backend):
    _FAMILIES.setdefault(backend.family, {})[backend.name] = backend
    return backend


def backend_names(family: str = "attention"):
    registry = _FAMILIES.get(family, {})
    return sorted(registry, key=lambda n: -registry[n].priority)


def get_backend(name: str, family: str = "attention") -> Backend:
    registry = _FAMILIES.get(family, {})
    if name not in registry:
        raise ValueError(f"backend must be 'auto' or one of {backend_names(family)}, got {name!r}")
    return registry[name]


class BackendUnavailable(RuntimeError):
    """A named backend cannot run this call; the message lists every reason."""


_RECORDERS: list = []


@contextlib.contextmanager
def record_choices():
    """Collects, in a list, the name of the backend each call inside the
    block runs on (for reports and debugging)."""
    names = []
    _RECORDERS.append(names)
    try:
        yield names
    finally:
        _RECORDERS.remove(names)


# Tiles at which a backend computed scores, reported by every backend to the
# counters open here: tests show with them that no backend visits a tile its
# plan does not list. Nothing is counted while no counter is open (kernels then
# compile without their per-tile atomic).
_TILE_COUNTERS: list = []


@contextlib.contextmanager
def count_tiles():
    """Counts, per pass, the (batch, head, tile) score computations of every
    call inside the block: a ``collections.Counter`` keyed by pass name
    ("forward", and "backward" for the torch engine, which scores each tile
    once for dq, dk and dv; "backward_dq" and "backward_dkdv" for the kernels,
    which score it once in each)."""
    counts = collections.Counter()
    _TILE_COUNTERS.append(counts)
    try:
        yield counts
    finally:
        _TILE_COUNTERS.remove(counts)


def counting_tiles() -> bool:
    return bool(_TILE_COUNTERS)


def add_tiles(pass_name: str, n: int):
    for counts in _TILE_COUNTERS:
        counts[pass_name] += int(n)


def add_kernel_tiles(tiles):
    """Add the three counters a kernel backend's kernels fill: forward, dQ, dK/dV."""
    for name, n in zip(("forward", "backward_dq", "backward_dkdv"), tiles.tolist()):
        add_tiles(name, n)


def select_backend(name: str, call: AttentionCall, family: str = "attention") -> Backend:
    backend = _select(name, call, family)
    for names in _RECORDERS:
        names.append(backend.name)
    return backend


def _select(name: str, call: AttentionCall, family: str = "attention") -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name == "auto":
        name = os.environ.get("TFK_BACKEND", "auto") or "auto"
        if family != "attention" and name not in _FAMILIES.get(family, {}):
            name = "auto"  # another family's backend: this family's "auto"
    if name != "auto":
        backend = get_backend(name, family)
        why = _reasons(backend, call)
        if why:
            raise BackendUnavailable(f"backend {name!r} cannot run this call: " + "; ".join(why))
        return backend
    refused = []
    for n in backend_names(family):
        backend = _FAMILIES[family][n]
        if not backend.auto_for(call):
            continue
        why = _reasons(backend, call)
        if not why:
            if refused:
                _warn_fallback(n, refused)
            return backend
        if not backend.routes_only:
            refused.append(f"{n}: " + "; ".join(why))
    raise BackendUnavailable("no backend can run this call: " + " | ".join(refused))


def _reasons(backend, call):
    why = backend.reasons(call)
    mods = getattr(call, "score_mod", None)
    if mods and backend.score_mods is not True:
        missing = [kind for kind in mods if kind not in backend.score_mods]
        if missing:
            why = why + [f"score_mod ({', '.join(missing)}) is not fused in this backend"]
    return why


class FallbackWarning(UserWarning):
    """"auto" passed over a backend that would have been its choice for this
    call, and runs a slower one."""


_WARNED: set = set()


def _warn_fallback(chosen, refused):
    """Once per distinct fallback: which backend refused, why, and what runs."""
    message = (f"tfk: backend='auto' runs this call on {chosen!r}, because " + " | ".join(refused)
               + f". Pass backend={chosen!r} to choose it explicitly, or remove the reason above.")
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, FallbackWarning, stacklevel=6)  # the caller of tfk.attention
