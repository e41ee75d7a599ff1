"""Mixture-of-Experts dispatch: routing, the router losses, grouped matmuls and
the experts feed-forward (Hugging Face 5.x layout), with a float64 reference
backend, a torch backend (the CPU default) and the kernel backends."""
from .api import (ExpertsCall, GroupedMMCall, MoEBackend, Routing, experts, grouped_mm,  # noqa: F401
                  kernel_reasons, load_balancing_loss, route, z_loss)
from . import kernel_backends  # noqa: F401 - registers "triton" (and the CUDA kernels' backends)
from .layer import MoE  # noqa: F401
from .reference import experts_reference, grouped_mm_reference  # noqa: F401

__all__ = ["route", "Routing", "load_balancing_loss", "z_loss", "grouped_mm", "experts", "MoE"]
