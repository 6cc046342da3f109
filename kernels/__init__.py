"""Triton kernels of rho-fused, installed as `rho_fused.kernels`.

One kernel per file beside its launcher. This package knows only Triton and torch tensors.
"""
