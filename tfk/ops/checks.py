"""Argument checks more than one op family shares (the error names the argument)."""
from __future__ import annotations

import torch


def check_key_padding_mask(mask, B, S, device, length="S", lead="query"):
    """None, or a bool (B, S) tensor on ``device``: True = a key to attend to.
    ``length`` and ``lead`` name the key length and the tensor whose device it
    must share, in the messages."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = a key to attend to), got {mask.dtype}")
    if tuple(mask.shape) != (B, S):
        raise ValueError(f"key_padding_mask must be (B, {length}) = {(B, S)}, got shape {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device}, expected {lead}'s device {device}")
