"""``tfk.moe``: Mixture-of-Experts dispatch (the family lives in tfk/ops/moe/)."""
from .ops.moe import (MoE, Routing, experts, grouped_mm, load_balancing_loss, route,  # noqa: F401
                      z_loss)

__all__ = ["route", "Routing", "load_balancing_loss", "z_loss", "grouped_mm", "experts", "MoE"]
