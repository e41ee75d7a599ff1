"""Triton kernels of tfk; installed as tfk.triton_kernels."""
