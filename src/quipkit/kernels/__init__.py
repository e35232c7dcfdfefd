"""Decode-and-multiply kernels: an eager reference plus registered fast paths."""
