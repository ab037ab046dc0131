"""Triton kernels of the CUDA backend (also run in Triton's interpreter on CPU with TRITON_INTERPRET=1)."""
