"""Triton kernels, each beside its pure-PyTorch reference. Imports nothing of editrt."""
