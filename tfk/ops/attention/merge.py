"""Exact merge of attention partial results by log-sum-exp.

A sub-pass over a subset of the keys returns ``out`` (the softmax-weighted
average over its keys) and ``lse`` (the log of its softmax denominator).  Two
disjoint subsets combine exactly:

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

A row that saw no key has ``lse = -inf`` and ``out = 0``; merging keeps that
convention (two empty rows stay empty, with no NaN).
"""
import torch


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Merge two partial results.

    Args:
        out_a, out_b: (..., L, D) partial outputs, float32 or float64.
        lse_a, lse_b: (..., L) natural-log denominators, same dtype; -inf for empty rows.
    Returns:
        (out, lse) with the shapes of the inputs.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    # exp(-inf - -inf) is NaN: an empty merged row takes weight 0 from both sides.
    empty = torch.isneginf(lse)
    safe = torch.where(empty, torch.zeros_like(lse), lse)
    w_a = torch.where(empty, torch.zeros_like(lse), torch.exp(lse_a - safe))
    w_b = torch.where(empty, torch.zeros_like(lse), torch.exp(lse_b - safe))
    return out_a * w_a.unsqueeze(-1) + out_b * w_b.unsqueeze(-1), lse
