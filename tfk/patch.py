"""Route torch's SDPA through tfk."""
import functools

import torch.nn.functional as F

from .ops.attention.api import scaled_dot_product_attention

# Patches in force, oldest first, and the function torch had before the first.
_ACTIVE: list = []
_UNPATCHED = None


def _apply():
    F.scaled_dot_product_attention = _ACTIVE[-1].function if _ACTIVE else _UNPATCHED


class patch_torch:
    """Replace ``torch.nn.functional.scaled_dot_product_attention`` with tfk's.

    As a context manager it restores torch's function on exit; as a plain call
    it returns a handle whose ``undo()`` removes it. Patches nest, and may be
    undone in any order: the most recent patch still in force routes the
    calls, and torch's own function returns when the last is undone. Where
    transformers is importable it also registers ``attn_implementation="tfk"``.

        with tfk.patch_torch():
            model(x)             # every SDPA call runs through tfk

        handle = tfk.patch_torch(backend="torch")
        ...
        handle.undo()
    """

    def __init__(self, backend="auto"):
        global _UNPATCHED
        self.function = functools.partial(scaled_dot_product_attention, backend=backend)
        if not _ACTIVE:
            _UNPATCHED = F.scaled_dot_product_attention
        _ACTIVE.append(self)
        _apply()
        from .integrations.transformers import register
        register()

    def undo(self):
        """Remove this patch (again: nothing)."""
        if self in _ACTIVE:
            _ACTIVE.remove(self)
            _apply()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False
