"""Route torch's SDPA through tfk."""
import functools

import torch.nn.functional as F

from .ops.attention.api import scaled_dot_product_attention


class patch_torch:
    """Replace ``torch.nn.functional.scaled_dot_product_attention`` with tfk's.

    As a context manager it restores torch's function on exit; as a plain call
    it returns a handle whose ``undo()`` restores it. Patches nest. Where
    transformers is importable it also registers ``attn_implementation="tfk"``.

        with tfk.patch_torch():
            model(x)             # every SDPA call runs through tfk

        handle = tfk.patch_torch(backend="torch")
        ...
        handle.undo()
    """

    def __init__(self, backend="auto"):
        self._previous = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = functools.partial(scaled_dot_product_attention, backend=backend)
        self._active = True
        from .integrations.transformers import register
        register()

    def undo(self):
        if self._active:
            F.scaled_dot_product_attention = self._previous
            self._active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False
